"""Semantic segmentation fine-tuning (``mcl-finetune task=semantic``): a segmenter of :mod:`mcl.segmentation.models`
from pretrained weights, trained with per-pixel cross-entropy on the labels of :class:`~mcl.segmentation.data.
SemanticCoco`, evaluated by mIoU, pixel accuracy and per-class IoU (torchmetrics)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from mcl.checkpoints import check_checkpoint_kind, load_checkpoint
from mcl.detection.finetune import (
    check_annotation_files,
    fit_and_evaluate,
    num_classes_of,
    step_schedule_optimizers,
    weight_report,
)
from mcl.segmentation.data import BACKGROUND, IGNORE_INDEX, SemanticCoco
from mcl.segmentation.models import build_segmenter
from mcl.segmentation.pretrained import load_pretrained

log = logging.getLogger(__name__)

# Parts whose weights weight_report compares (name -> parameter-name prefixes), for both architectures.
SEGMENTER_PARTS = {
    "stem": ("backbone.body.conv1.", "backbone.conv1."),
    "res2": ("backbone.body.layer1.", "backbone.layer1."),
    "res3": ("backbone.body.layer2.", "backbone.layer2."),
    "res4": ("backbone.body.layer3.", "backbone.layer3."),
    "res5": ("backbone.body.layer4.", "backbone.layer4."),
    "fpn": ("backbone.fpn.",),
    "head": ("head.",),
}


class SegmentationModule(pl.LightningModule):
    """Fine-tunes a segmenter: cross-entropy over every labelled pixel (``IGNORE_INDEX`` left out); validation
    accumulates the confusion of every pixel and logs ``val/mIoU`` (the mean IoU over the classes present in the
    labels or the predictions), ``val/pixel_accuracy`` and ``val/IoU/<class>``."""

    def __init__(
        self,
        segmenter: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        milestones: list[float],
        warmup_steps: int,
        class_names: dict[int, str],
    ):
        super().__init__()
        self.segmenter = segmenter
        self.optimizer_factory = optimizer
        self.milestones = milestones
        self.warmup_steps = warmup_steps
        self.class_names = class_names
        classes = len(class_names)
        # A class absent from both the labels and the predictions has no IoU (NaN), and mIoU leaves it out.
        self.iou = MulticlassJaccardIndex(
            classes, average="none", ignore_index=IGNORE_INDEX, zero_division=float("nan")
        )
        self.pixel_accuracy = MulticlassAccuracy(classes, average="micro", ignore_index=IGNORE_INDEX)
        self.last_evaluation: dict[str, Any] = {}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.segmenter(images), labels, ignore_index=IGNORE_INDEX)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite segmentation loss {float(loss)} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        predictions = self.segmenter(images).argmax(1)
        self.iou.update(predictions, labels)
        self.pixel_accuracy.update(predictions, labels)

    def on_validation_epoch_end(self) -> None:
        per_class = self.iou.compute()  # reduced over ranks by torchmetrics
        accuracy = self.pixel_accuracy.compute()
        self.iou.reset()
        self.pixel_accuracy.reset()
        mean_iou = 100 * torch.nanmean(per_class)
        self.log("val/mIoU", mean_iou, prog_bar=True)
        self.log("val/pixel_accuracy", 100 * accuracy)
        by_name = {}
        for index, value in enumerate(per_class.tolist()):
            name = metric_name(self.class_names[index])
            by_name[name] = None if value != value else 100 * value  # NaN: a class seen nowhere
            if by_name[name] is not None:
                self.log(f"val/IoU/{name}", by_name[name])
        self.last_evaluation = {
            "mIoU": float(mean_iou),
            "pixel_accuracy": float(100 * accuracy),
            "IoU": by_name,
        }

    def configure_optimizers(self):
        return step_schedule_optimizers(self, self.optimizer_factory, self.milestones, self.warmup_steps)


def metric_name(name: str) -> str:
    """A class name as a metric key part: ``T-shirt/top`` -> ``T_shirt_top`` (a ``/`` would open a W&B section)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_") or "class"


# Keys of the ``model`` config passed to build_segmenter as they are.
SEGMENTER_OPTIONS = ("fpn_channels", "head_channels", "frozen_stages", "image_mean", "image_std")


def class_names_of(dataset: SemanticCoco, num_classes: int) -> dict[int, str]:
    """Label -> name for every output of the head: the background, the dataset's categories, ``class_<i>`` for the
    ids between them that no category names."""
    names = {index: f"class_{index}" for index in range(num_classes)}
    names[BACKGROUND] = "background"
    names.update({i: name for i, name in dataset.categories.items() if i < num_classes})
    return names


def finetune_semantic(cfg: DictConfig) -> dict[str, Any]:
    """Build, load, fine-tune and evaluate a segmenter; returns ``val/mIoU``-style metrics, ``IoU`` per class and
    the weight report."""
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("ckpt_path"):
        check_checkpoint_kind(
            load_checkpoint(cfg.ckpt_path, map_location="meta"),
            cfg.ckpt_path,
            "segmenter",
            "mcl-finetune task=semantic",
        )
    check_annotation_files(cfg.data)
    train_set = SemanticCoco(cfg.data.train_images, cfg.data.train_annotations, train=True)
    val_set = SemanticCoco(cfg.data.val_images, cfg.data.val_annotations)
    num_classes = cfg.model.num_classes or num_classes_of(cfg.data.train_annotations, train_set.coco.dataset)
    options = {key: cfg.model[key] for key in SEGMENTER_OPTIONS if key in cfg.model}
    options = {k: (list(v) if v is not None and k.startswith("image_") else v) for k, v in options.items()}
    segmenter = build_segmenter(cfg.model.arch, cfg.model.backbone, num_classes, **options)
    if cfg.model.pretrained:
        missing = load_pretrained(segmenter, cfg.model.arch, cfg.model.pretrained)
        log.info("loaded %s; %d keys left to the segmenter: %s", cfg.model.pretrained, len(missing), missing[:8])
    module = SegmentationModule(
        segmenter,
        hydra.utils.instantiate(cfg.optimizer),
        list(cfg.detection_schedule.milestones),
        cfg.detection_schedule.warmup_steps,
        class_names_of(train_set, num_classes),
    )
    metrics, weights = fit_and_evaluate(cfg, module, segmenter, train_set, val_set)
    metrics["IoU"] = module.last_evaluation.get("IoU", {})
    metrics["weights"] = weight_report(*weights, parts=SEGMENTER_PARTS)
    return metrics
