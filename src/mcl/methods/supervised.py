"""Supervised multi-level pretraining (the appendix's Fig. 4).

S augmented views of each labelled image; view s is shrunk by ``2**s`` and tiled into level-s montages, the labels
are assembled in the same cell order, and the shared pyramid + tile head + a linear classifier give one logit vector
per cell. Loss = sum over levels of ``w_s * cross_entropy`` (:class:`mcl.loss.MultiLevelCrossEntropy`). It shares
montages, pyramid and head with :class:`MCL`.

``classifier_input="pooled_c5"`` with ``levels=1`` is plain supervised pretraining instead: one view per image and a
linear classifier on the globally pooled C5, with no pyramid or tile head (the transfer benchmark's control).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mcl.cells import all_map_cells, level_cells, own_cells
from mcl.data.device import SourceBatch
from mcl.loss import MultiLevelCrossEntropy
from mcl.methods.base import VAL_LOADER, MultiLevelModule
from mcl.montage import assemble_levels, check_views
from mcl.online_probe import LevelZeroFeatures, level_zero_features, train_probe

# What the classifier reads: every montage cell's tile-head feature, or the pooled C5 of whole views (levels=1).
CLASSIFIER_INPUTS = ("tiles", "pooled_c5")


def assemble_labels(labels: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """The label of every montage cell: ``labels`` ``(B,)`` indexed by ``sources`` ``(M, g, g)`` -> ``(M, g, g)``."""
    return labels[sources]


class SupervisedMultiLevel(MultiLevelModule):
    """Multi-level cross-entropy on montages of labelled views.

    A training batch is ``(views, labels)`` with ``views`` ``(B, levels, C, H, W)`` (one view per level) and
    ``labels`` ``(B,)`` in ``0..num_classes-1``. ``loss`` is a :class:`~mcl.loss.MultiLevelCrossEntropy` built for
    ``levels`` (``loss=cross_entropy``, which ``method=supervised`` selects; its defaults when ``None``): it holds the
    level weights and the label smoothing. Keyword arguments not listed here go to :class:`MultiLevelModule`.
    """

    default_loss = MultiLevelCrossEntropy
    view_mode = "supervised"

    def __init__(
        self,
        *args: Any,
        loss: MultiLevelCrossEntropy | None = None,
        num_classes: int = 10,
        classifier_input: str = "tiles",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "loss"])
        self.set_loss(loss, MultiLevelCrossEntropy, "loss=cross_entropy")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} is invalid: a classifier needs at least 2 classes")
        if classifier_input not in CLASSIFIER_INPUTS:
            raise ValueError(f"classifier_input={classifier_input!r} is invalid: use one of {CLASSIFIER_INPUTS}")
        if classifier_input == "pooled_c5" and self.levels != 1:
            raise ValueError(
                f"classifier_input='pooled_c5' is plain single-view supervised training, but levels={self.levels}: "
                "set levels=1, or classifier_input=tiles for the multi-level method"
            )
        self.num_classes = num_classes
        self.classifier_input = classifier_input
        if classifier_input == "pooled_c5":
            # No pyramid or tile head: nothing but the backbone is trained, exported or transferred.
            self.neck = None
            self.head = None
            self.classifier = nn.Linear(self.backbone.channels[-1], num_classes)
        else:
            self.classifier = nn.Linear(self.neck.out_channels, num_classes)

    def check_host_batch(self, batch: Any) -> None:
        """Check the labels of every batch while it is still on the host (the datamodule calls this before the
        transfer): the same check on the device would make the host wait for it at every step."""
        self.check_labels(batch.labels if isinstance(batch, SourceBatch) else batch[1])

    def check_labels(self, labels: torch.Tensor) -> None:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            bad = high if high >= self.num_classes else low
            raise ValueError(
                f"label {bad} is out of range for the classifier: num_classes={self.num_classes} allows "
                f"0..{self.num_classes - 1}; set method.num_classes to the dataset's class count"
            )

    def level_logits(
        self,
        montages: list[tuple[torch.Tensor, torch.Tensor]],
        labels: torch.Tensor,
        pooled: list[torch.Tensor] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level, ``(logits (cells, num_classes), cell labels (cells,))`` for ``(montages, sources)`` pairs;
        ``pooled`` receives the level-0 montages' detached pooled C5 (the online probe's input)."""
        if self.classifier_input == "pooled_c5":
            ((images, sources),) = montages
            features = self.backbone.forward_pooled(images)
            if pooled is not None:
                pooled.append(features.detach())
            return [(self.classifier(features), assemble_labels(labels, sources).flatten())]
        images = [level_images for level_images, _ in montages]
        if self.all_pyramid_maps:  # every map of every image, the head once per map (MultiLevelModule)
            per_map = all_map_cells(images, self.backbone, self.neck, self.head, pooled=pooled)
            features = own_cells(per_map, [len(level_images) for level_images in images])
        else:
            features = level_cells(images, self.backbone, self.neck, self.head, head_per_level=False, pooled=pooled)
        return [
            (self.classifier(cells), assemble_labels(labels, sources).flatten())
            for cells, (_, sources) in zip(features, montages, strict=True)
        ]

    def forward_losses(
        self, views: torch.Tensor, labels: torch.Tensor, level_zero: LevelZeroFeatures | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and per-level logs for ``views`` ``(B, levels, C, H, W)`` and ``labels`` ``(B,)``;
        ``level_zero``, for the online probe, receives the level-0 montages' detached pooled C5 and batch indices."""
        check_views(views, self.levels, self.image_size, self.view_mode)
        if self._trainer is None:  # in training, the datamodule had the labels checked on the host (check_host_batch)
            self.check_labels(labels)
        montages = self.build_montages(views)
        pooled = None
        if level_zero is not None:
            level_zero.sources.append(montages[0][1].flatten())
            pooled = level_zero.pooled
        logits, cell_labels = zip(*self.level_logits(montages, labels, pooled), strict=True)
        return self.loss(logits, cell_labels)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        views, labels = batch
        level_zero = level_zero_features(self)
        loss, logs = self.forward_losses(views, labels, level_zero)
        self.log_loss(loss, logs)
        train_probe(self, level_zero, labels)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        features = super().validation_step(batch, batch_idx, dataloader_idx)
        if dataloader_idx == VAL_LOADER:
            self.log_level_accuracy(*batch)
        return features

    def log_level_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """``val/acc`` on the plain images and ``val/acc_level{s}`` on level-s montages of the same images, drawn
        from the run's ``seed`` afresh for every batch (the same montages at every validation)."""
        generator = torch.Generator(device=images.device).manual_seed(self.seed)
        montages = assemble_levels(images, self.levels, self.montage_rule, self.downscale_mode, generator)
        montages[0] = (images, torch.arange(len(images), device=images.device).view(-1, 1, 1))
        for level, (logits, cell_labels) in enumerate(self.level_logits(montages, labels)):
            accuracy = (logits.argmax(1) == cell_labels).float().mean() * 100
            size = len(cell_labels)
            self.log(f"val/acc_level{level}", accuracy, add_dataloader_idx=False, sync_dist=True, batch_size=size)
            if level == 0:
                self.log("val/acc", accuracy, prog_bar=True, add_dataloader_idx=False, sync_dist=True, batch_size=size)
