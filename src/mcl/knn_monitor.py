"""``val/knn_top1``, the kNN monitor of pretraining, as a Lightning callback."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics.utilities import dim_zero_cat

from mcl.knn import KNNAccuracy


class KNNMonitor(pl.Callback):
    """Weighted kNN top-1 accuracy (:class:`~mcl.knn.KNNAccuracy`) of the features a model's ``validation_step``
    returns, ``(B, D)`` for the batch's images: those of loader ``bank_loader`` are the labelled bank, those of the
    other loader the queries. Logged as ``val/knn_top1`` at the end of a validation epoch that had both; the metric
    gathers every rank's features, so every rank logs the same value (checkpointing needs it on all of them).

    With ``keep_bank`` set (by :class:`~mcl.pictures.RunPictures` for its feature map), the epoch's end also keeps
    this rank's bank as ``kept_bank``, ``(features (N, D) normalised, labels (N,))``, until the next validation
    starts: what was collected anyway, nothing run again."""

    def __init__(self, k: int = 200, temperature: float = 0.1, bank_loader: int = 0):
        self.metric = KNNAccuracy(k, temperature)
        self.bank_loader = bank_loader
        self.keep_bank = False
        self.kept_bank: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.metric.to(pl_module.device)
        self.metric.reset()
        self.kept_bank = None

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: torch.Tensor,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        _, labels = batch
        self.metric.update(outputs, labels, bank=dataloader_idx == self.bank_loader)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.keep_bank and len(self.metric.bank_features) > 0:  # this rank's entries, before compute gathers
            self.kept_bank = (dim_zero_cat(self.metric.bank_features), dim_zero_cat(self.metric.bank_labels))
        if self.metric.has_bank_and_queries:  # not with one loader alone, e.g. a validate call on one of them
            pl_module.log("val/knn_top1", self.metric.compute(), prog_bar=True)
        self.metric.reset()
