"""Linear evaluation: ``mcl-linear checkpoint=... key=value ...`` (Hydra, ``conf/linear.yaml``).

The appendix protocol: the pretrained backbone is frozen (BN statistics included), a linear classifier on its
pooled C5 features is trained with SGD (momentum 0.9, batch 256, lr 10, no weight decay, 100 epochs) on random
resized crops and flips, and tested on a resize + centre crop. Reports top-1 and top-5.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, open_dict
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from mcl.backbones import Backbone
from mcl.export import backbone_state, load_pretraining_checkpoint
from mcl.optim import warmup_cosine
from mcl.runs import open_run_logs
from mcl.runtime import (
    CONFIG_DIR,
    closing_loggers,
    instantiate_trainer,
    print_summary,
    save_metrics,
    scalar_metrics,
)
from mcl.validation import check_config

log = logging.getLogger(__name__)


def frozen_backbone(checkpoint: str) -> tuple[Backbone, dict[str, Any]]:
    """The pretrained backbone of an ``mcl-train`` checkpoint, frozen, and the checkpoint's hyper-parameters. Another
    kind of checkpoint (a linear probe, a detector, an export) is refused with what to pass instead."""
    state, hparams = load_pretraining_checkpoint(checkpoint, entry_point="mcl-linear")
    backbone = Backbone(**hparams["backbone"], image_size=hparams["image_size"])
    backbone.model.load_state_dict(backbone_state(state))
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    return backbone.eval(), hparams


class LinearProbe(pl.LightningModule):
    """A linear classifier on frozen pooled backbone features, ``(B, C, H, W)`` -> ``(B, num_classes)``."""

    def __init__(self, backbone: Backbone, num_classes: int, optimizer: Callable[..., torch.optim.Optimizer]):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.channels[-1], num_classes)
        self.optimizer_factory = optimizer
        # Top-1/top-5 as SSL papers report them: the fraction of images classified right (micro). The mean of
        # per-class recalls (torchmetrics' default, macro) is logged beside them as val/top1_macro.
        self.top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.top1_macro = MulticlassAccuracy(num_classes, top_k=1, average="macro")

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()  # frozen means frozen BN statistics too
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone.forward_pooled(images)
        return self.classifier(features)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        for metric in (self.top1, self.top5, self.top1_macro):
            metric.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        self.log("val/top1", 100.0 * self.top1.compute(), prog_bar=True, sync_dist=True)
        self.log("val/top5", 100.0 * self.top5.compute(), sync_dist=True)
        self.log("val/top1_macro", 100.0 * self.top1_macro.compute(), sync_dist=True)
        for metric in (self.top1, self.top5, self.top1_macro):
            metric.reset()

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.classifier.parameters())
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, 0, 1.0, 0.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.no_grad()
def loader_features(backbone: Backbone, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, C5), labels (N,))``: the frozen backbone's pooled C5 of every ``(images, labels)`` batch."""
    backbone.eval()
    features, labels = [], []
    for images, targets in loader:
        features.append(backbone.forward_pooled(images).float())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


def feature_probe_top1(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    weight_decay: float = 1e-4,
    iterations: int = 200,
) -> float:
    """Micro top-1 (in %) of a multinomial logistic regression fitted on fixed features (L-BFGS, L2 penalty).

    The cheap linear probe of benchmarks and notebooks: features are computed once, without augmentation, and
    standardised with the training set's mean and std. ``mcl-linear`` is the augmented SGD protocol of papers.
    """
    (train_x, train_y), (test_x, test_y) = train, test
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(torch.cat([train_y, test_y]).max()) + 1
    classifier = nn.Linear(train_x.shape[1], num_classes)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(train_x), train_y) + weight_decay * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return 100.0 * (classifier(test_x).argmax(1) == test_y).float().mean().item()


def linear_eval(cfg: DictConfig) -> dict[str, float]:
    """Train and test the linear probe; returns ``val/top1`` and ``val/top5`` (in %)."""
    pl.seed_everything(cfg.seed, workers=True)
    backbone, hparams = frozen_backbone(cfg.checkpoint)
    with open_dict(cfg):
        cfg.data.image_size = cfg.data.image_size or hparams["image_size"]
    datamodule = hydra.utils.instantiate(cfg.data, view_mode="supervised", views_per_side=1)
    datamodule.setup("fit")
    squeeze = lambda batch: (torch.stack([views[0] for views, _ in batch]), torch.tensor([y for _, y in batch]))
    loader = dict(batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers)
    train_loader = DataLoader(datamodule.train_set, shuffle=True, drop_last=True, collate_fn=squeeze, **loader)
    val_loader = DataLoader(datamodule.val_set, **loader)
    probe = LinearProbe(backbone, datamodule.num_classes, hydra.utils.instantiate(cfg.optimizer))
    trainer = instantiate_trainer(cfg)
    with closing_loggers(trainer):
        trainer.fit(probe, train_loader, val_loader)
    metrics = scalar_metrics(trainer.callback_metrics)
    if trainer.is_global_zero:
        save_metrics(metrics, cfg.output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="linear")
def main(cfg: DictConfig) -> float | None:
    check_config(cfg)
    open_run_logs()  # the job's log file (mcl.runs.RunLogFile)
    metrics = linear_eval(cfg)
    if pl.utilities.rank_zero.rank_zero_only.rank == 0:
        print_summary(metrics, ("val/top1", "val/top5", "train/loss"), f"mcl-linear: {cfg.checkpoint}")
    return metrics.get("val/top1")


if __name__ == "__main__":
    main()
