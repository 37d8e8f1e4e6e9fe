"""Detection fine-tuning: ``mcl-finetune key=value ...`` (Hydra, ``conf/finetune.yaml``, ``task=detection``).

A torchvision Faster/Mask R-CNN FPN v2, RetinaNet v2 or Faster/Mask R-CNN C4 (ResNet-18 or -50) built from MCL
weights, trained on any COCO-format dataset and evaluated with pycocotools. :func:`finetune` returns the metrics,
``ap_by_iou`` included.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from mcl.checkpoints import check_checkpoint_kind, load_checkpoint
from mcl.data.sources import MissingDatasetError
from mcl.detection.coco import (
    STAT_NAMES,
    THIRD_NAMES,
    AnnotationFileError,
    CocoDetection,
    area_thirds,
    coco_evaluate,
    collate,
    json_folder_contents,
    read_annotation_file,
    to_coco_results,
)
from mcl.detection.models import MASK_ARCHITECTURES, build_detector
from mcl.detection.pretrained import load_pretrained
from mcl.distributed import world_size
from mcl.runtime import (
    closing_loggers,
    instantiate_trainer,
    save_metrics,
    scalar_metrics,
)

log = logging.getLogger(__name__)


def step_schedule(step: int, warmup_steps: int, milestones: list[int], gamma: float = 0.1) -> float:
    """Learning-rate factor: linear warmup from 0.001, then ``gamma`` at each milestone step (the 1x/2x schedules)."""
    warmup = min(1.0, 0.001 + (1 - 0.001) * step / warmup_steps) if warmup_steps else 1.0
    return warmup * gamma ** sum(step >= m for m in milestones)


class DetectionModule(pl.LightningModule):
    """Fine-tunes a torchvision detector; validation runs COCO evaluation (boxes, and masks for Mask R-CNN)."""

    def __init__(
        self,
        detector: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        milestones: list[float],
        warmup_steps: int = 100,
        masks: bool = False,
    ):
        super().__init__()
        self.detector = detector
        self.optimizer_factory = optimizer
        self.milestones = milestones
        self.warmup_steps = warmup_steps
        self.masks = masks
        self.coco = None
        # Object-area ranges for APs3/APm3/APl3 (see mcl.detection.coco.area_thirds); None: COCO's stats only.
        self.area_ranges: list[tuple[float, float]] | None = None
        self._results: list[dict] = []
        self.last_evaluation: dict[str, Any] = {}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.detector(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite detection loss {float(loss)} at step {self.global_step}: {losses}")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(images))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        predictions = self.detector(images)
        ids = [int(t["image_id"]) for t in targets]
        self._results.extend(to_coco_results(predictions, ids, self.masks))

    def on_validation_epoch_end(self) -> None:
        results = self._results
        self._results = []
        if world_size() > 1:
            gathered: list[list[dict]] = [[] for _ in range(world_size())]
            dist.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        evaluation = {"bbox": coco_evaluate(self.coco, results, "bbox", self.area_ranges)}
        if self.masks:
            evaluation["segm"] = coco_evaluate(self.coco, results, "segm")
        self.last_evaluation = evaluation
        for name in STAT_NAMES:
            self.log(f"val/{name}", evaluation["bbox"][name], prog_bar=name == "AP")
            if self.masks:
                self.log(f"val/mask_{name}", evaluation["segm"][name])
        for name in THIRD_NAMES if self.area_ranges else ():
            self.log(f"val/{name}", evaluation["bbox"][name])

    def configure_optimizers(self):
        return step_schedule_optimizers(self, self.optimizer_factory, self.milestones, self.warmup_steps)


def step_schedule_optimizers(
    module: pl.LightningModule, optimizer_factory: Callable[..., torch.optim.Optimizer], milestones: list[float],
    warmup_steps: int,
) -> dict[str, Any]:  # fmt: skip
    """The fine-tuning optimiser over ``module``'s trainable parameters and its per-step :func:`step_schedule`
    (``milestones``: fractions of the Trainer's steps)."""
    optimizer = optimizer_factory([p for p in module.parameters() if p.requires_grad])
    total = max(1, int(module.trainer.estimated_stepping_batches))
    steps = [int(fraction * total) for fraction in milestones]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: step_schedule(step, min(warmup_steps, total), steps)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# Parts of an R-CNN whose weights are reported apart by weight_report: name -> parameter-name prefix.
DETECTOR_PARTS = {
    "stem": "backbone.body.conv1.",
    "res2": "backbone.body.layer1.",
    "res3": "backbone.body.layer2.",
    "res4": "backbone.body.layer3.",
    "res5": "backbone.body.layer4.",  # the C4 R-CNNs' res5 is their box head (roi_heads.box_head.layer4)
    "fpn": "backbone.fpn.",
    "rpn": "rpn.",
    "box_head": "roi_heads.box_head.",
    "box_predictor": "roi_heads.box_predictor.",
}


def conv_weights(detector: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The detector's conv and linear weights (``ndim >= 2``), detached copies, by parameter name."""
    return {name: p.detach().clone() for name, p in detector.named_parameters() if p.ndim >= 2}


def weight_report(
    start: dict[str, torch.Tensor],
    end: dict[str, torch.Tensor],
    parts: dict[str, str | tuple[str, ...]] | None = None,
) -> dict[str, dict[str, float]]:
    """Per part of ``parts`` (name -> parameter-name prefix or prefixes; default :data:`DETECTOR_PARTS`): the
    conv/linear weight norm when fine-tuning started and ended, and how far the weights moved relative to where they
    started (``||w_end - w_start|| / ||w_start||``).

    A conv followed by BatchNorm is scale-invariant, so its effective step is ``lr / ||w||^2``: weights loaded with
    a norm k times the random initialisation's move k^2 times less for the same learning rate.
    """
    report = {}
    for part, prefix in (parts or DETECTOR_PARTS).items():
        names = [name for name in start if name.startswith(prefix)]
        if not names:
            continue
        norm_start = torch.sqrt(sum(start[n].double().pow(2).sum() for n in names))
        norm_end = torch.sqrt(sum(end[n].double().pow(2).sum() for n in names))
        moved = torch.sqrt(sum((end[n].double() - start[n].double()).pow(2).sum() for n in names))
        report[part] = {
            "norm_start": float(norm_start),
            "norm_end": float(norm_end),
            "relative_move": float(moved / norm_start),
        }
    return report


# Keys of the ``model`` config passed to build_detector as they are.
DETECTOR_OPTIONS = (
    "min_size", "max_size", "anchor_base_size", "proposals_train", "proposals_test", "rois_per_image",
    "image_mean", "image_std", "fpn_channels", "roi_canonical_scale", "roi_canonical_level", "frozen_stages",
    "roi_pool_size",
)  # fmt: skip


def num_classes_of(annotation_file: str | Path, data: dict[str, Any] | None = None) -> int:
    """Category ids are used as labels, so the head needs ``max id + 1`` outputs (0 is the background). ``data``: the
    file's JSON when it was read already."""
    data = read_annotation_file(annotation_file, ("categories",)) if data is None else data
    try:
        ids = [int(category["id"]) for category in data.get("categories") or ()]
    except (KeyError, TypeError, ValueError) as error:
        raise AnnotationFileError(
            f"{annotation_file}: a category has no integer 'id' ({type(error).__name__}: {error}); fix the file"
        ) from error
    if not ids:
        raise AnnotationFileError(
            f"{annotation_file} lists no categories, so the number of classes is unknown: add its 'categories' or "
            "set model.num_classes"
        )
    return max(ids) + 1


# The data keys of mcl-finetune's annotation files, and the file each names by default under data.root.
ANNOTATION_KEYS = {"train_annotations": "annotations/train.json", "val_annotations": "annotations/val.json"}


def check_annotation_files(data: DictConfig) -> None:
    """Stop before anything is built when ``data.train_annotations`` or ``data.val_annotations`` is not a file: the
    message names the keys and paths, what the folder looked in holds, and the layout expected under ``data.root``."""
    missing = {key: Path(data[key]) for key in ANNOTATION_KEYS if not Path(data[key]).is_file()}
    if not missing:
        return
    named = ", ".join(f"data.{key}={path}" for key, path in missing.items())
    looked = [json_folder_contents(folder) for folder in sorted({path.parent for path in missing.values()})]
    expected = " and ".join(ANNOTATION_KEYS.values())
    raise MissingDatasetError(
        f"COCO annotation file(s) not found: {named}. Looked in: {'; '.join(looked)}. mcl-finetune expects "
        f"data.root (now {data.get('root')}) to hold train/, val/ and {expected}; point data.root at such a "
        "dataset, or set data.train_annotations and data.val_annotations to your files"
    )


def fit_and_evaluate(
    cfg: DictConfig, module: pl.LightningModule, network: torch.nn.Module, train_set, val_set, collate_fn=None
) -> tuple[dict[str, Any], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Fit ``module`` on ``train_set``, validating on ``val_set`` (``cfg.data`` loaders, ``cfg.detection_schedule``
    epochs, resumed from ``cfg.ckpt_path``); rank 0 writes ``metrics.json`` and the module's ``last_evaluation`` as
    ``evaluation.json``. Returns the scalar metrics and ``network``'s conv weights before and after (for
    :func:`weight_report`)."""
    loader = dict(batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, collate_fn=collate_fn)
    start_weights = conv_weights(network)
    trainer = instantiate_trainer(cfg, max_epochs=cfg.detection_schedule.max_epochs)
    with closing_loggers(trainer):
        trainer.fit(
            module,
            DataLoader(train_set, shuffle=True, drop_last=True, **loader),
            DataLoader(val_set, **loader),
            ckpt_path=cfg.get("ckpt_path"),
        )
    metrics: dict[str, Any] = scalar_metrics(trainer.callback_metrics)
    if trainer.is_global_zero:
        save_metrics(metrics, cfg.output_dir)
        output = Path(cfg.output_dir) / "evaluation.json"
        output.write_text(json.dumps(module.last_evaluation, indent=1))
    return metrics, (start_weights, conv_weights(network))


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Build, load, fine-tune and evaluate; returns ``val/AP``-style metrics and ``ap_by_iou`` (per IoU threshold)."""
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("ckpt_path"):
        check_checkpoint_kind(
            load_checkpoint(cfg.ckpt_path, map_location="meta"), cfg.ckpt_path, "detector", "mcl-finetune"
        )
    check_annotation_files(cfg.data)
    masks = cfg.model.arch in MASK_ARCHITECTURES
    drop = bool(cfg.data.get("drop_degenerate_boxes", False))
    train_set = CocoDetection(cfg.data.train_images, cfg.data.train_annotations, masks, True, drop)
    val_set = CocoDetection(cfg.data.val_images, cfg.data.val_annotations, masks, drop_degenerate_boxes=drop)
    num_classes = cfg.model.num_classes or num_classes_of(cfg.data.train_annotations, train_set.coco.dataset)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    options = {key: model[key] for key in DETECTOR_OPTIONS if key in model}
    detector = build_detector(cfg.model.arch, cfg.model.backbone, num_classes, **options)
    if cfg.model.pretrained:
        missing = load_pretrained(detector, cfg.model.arch, cfg.model.pretrained)
        log.info("loaded %s; %d keys left to the detector: %s", cfg.model.pretrained, len(missing), missing[:8])
    module = DetectionModule(
        detector,
        hydra.utils.instantiate(cfg.optimizer),
        list(cfg.detection_schedule.milestones),
        cfg.detection_schedule.warmup_steps,
        masks,
    )
    module.coco = val_set.coco
    if cfg.get("evaluation", {}).get("area_thirds", False):
        module.area_ranges = area_thirds(val_set.coco)
    metrics, weights = fit_and_evaluate(cfg, module, detector, train_set, val_set, collate)
    metrics["ap_by_iou"] = module.last_evaluation.get("bbox", {}).get("ap_by_iou", {})
    metrics["weights"] = weight_report(*weights)
    if module.area_ranges:
        metrics["area_ranges"] = module.area_ranges
    return metrics
