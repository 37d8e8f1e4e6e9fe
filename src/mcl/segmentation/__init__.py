"""Semantic segmentation transfer: ``mcl-finetune task=semantic``."""
