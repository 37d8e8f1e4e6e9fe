"""Multi-Level Contrastive Learning."""
