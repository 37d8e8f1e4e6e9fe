"""MCL: self-supervised multi-level contrastive pretraining against a momentum target (SPEC §1, §4-§6)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mcl.heads import MLP
from mcl.loss import LOSSES, TARGET_ASSIGNMENTS, multi_level_loss, per_image_targets
from mcl.methods.base import MultiLevelModule, cell_features
from mcl.momentum import cosine_momentum, ema_update, make_target


class MCL(MultiLevelModule):
    """Online network (backbone -> pyramid -> tile head -> projector -> per-level predictor) against an EMA target.

    A training batch is ``(views, labels)`` with ``views`` ``(B, 2, levels, C, H, W)``: for each augmentation side,
    one view per level. Labels are ignored. Keyword arguments not listed here go to :class:`MultiLevelModule`.
    """

    def __init__(
        self,
        *args: Any,
        loss: str = "infonce",
        temperature: float = 1.0,
        target_assignment: str = "top",
        projector_hidden_dim: int = 2048,
        embedding_dim: int = 256,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(ignore=["optimizer"])
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is invalid: use one of {LOSSES}")
        if target_assignment not in TARGET_ASSIGNMENTS:
            raise ValueError(f"target_assignment={target_assignment!r} is invalid: use one of {TARGET_ASSIGNMENTS}")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} is invalid: it must be > 0")
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(
                f"base_momentum={base_momentum}, final_momentum={final_momentum} are invalid: "
                "they need 0 <= base_momentum <= final_momentum <= 1"
            )
        self.loss_name = loss
        self.temperature = temperature
        self.target_assignment = target_assignment
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum
        channels = self.neck.out_channels
        self.projector = MLP(channels, projector_hidden_dim, embedding_dim, final_norm=True)
        self.predictors = nn.ModuleList(
            MLP(embedding_dim, projector_hidden_dim, embedding_dim) for _ in range(self.levels)
        )
        self.target_backbone = make_target(self.backbone)
        self.target_neck = make_target(self.neck)
        self.target_head = make_target(self.head)
        self.target_projector = make_target(self.projector)

    @property
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The ``(online, target)`` modules that the EMA update ties together; the predictors have no target."""
        return [
            (self.backbone, self.target_backbone),
            (self.neck, self.target_neck),
            (self.head, self.target_head),
            (self.projector, self.target_projector),
        ]

    @torch.no_grad()
    def target_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Target ``z`` of plain level-0 views ``(N, C, H, W)`` -> ``(N, embedding_dim)``.

        The target stays in train mode, so its BN layers use batch statistics, as in BYOL.
        """
        (features,) = cell_features([(images, 0)], self.target_backbone, self.target_neck, self.target_head)
        return self.target_projector(features)

    @torch.no_grad()
    def assigned_targets(
        self,
        views: torch.Tensor,
        groups: list[tuple[torch.Tensor, int]],
        sources: list[list[torch.Tensor]],
    ) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]] | None]:
        """``targets[side][j]`` ``(B, D)`` for each target level ``j`` and, beyond ``top``, the images present.

        ``top`` embeds the plain level-0 views only. ``same-level`` and ``all-levels`` run the target network on the
        same montages as the online network (the other side's montages, with their own independent cell layout) and
        give each image the normalised mean of its cells, so the target cost grows like the online cost (1.3125x
        for the paper's 3 levels).
        """
        if self.target_assignment == "top":
            plain = views[:, :, 0].transpose(0, 1).flatten(0, 1)  # (2B, C, H, W), side-major
            return [[t] for t in self.target_embeddings(plain).chunk(2)], None
        features = cell_features(groups, self.target_backbone, self.target_neck, self.target_head)
        cells = self.target_projector(torch.cat(features)).split([len(f) for f in features])
        targets: list[list[torch.Tensor]] = [[], []]
        present: list[list[torch.Tensor]] = [[], []]
        for side in range(2):
            for level in range(self.levels):
                z, mask = per_image_targets(cells[side * self.levels + level], sources[side][level], len(views))
                targets[side].append(z)
                present[side].append(mask)
        return targets, present

    def forward_losses(self, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and per-level logs for ``views`` ``(B, 2, levels, C, H, W)``."""
        self.check_views(views, level_axis=2)
        sides = [self.build_montages(views[:, side]) for side in range(2)]
        groups = [(montages, level) for side in sides for level, (montages, _) in enumerate(side)]
        embeddings = self.projector(torch.cat(cell_features(groups, self.backbone, self.neck, self.head)))
        sizes = [sources.numel() for side in sides for _, sources in side]
        per_group = embeddings.split(sizes)  # side-major: (A, level 0), (A, level 1), ..., (B, level 0), ...
        predictions: list[list[torch.Tensor]] = [[], []]
        for level, predictor in enumerate(self.predictors):
            both = [per_group[side * self.levels + level] for side in range(2)]
            for side, prediction in enumerate(predictor(torch.cat(both)).split([len(b) for b in both])):
                predictions[side].append(prediction)
        sources = [[s.flatten() for _, s in side] for side in sides]
        targets, present = self.assigned_targets(views, groups, sources)
        return multi_level_loss(
            predictions,
            sources,
            targets,
            self.level_weights,
            self.loss_name,
            self.temperature,
            self.target_assignment,
            present,
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        views, _ = batch
        loss, logs = self.forward_losses(views)
        self.check_finite(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{name}": value for name, value in logs.items()})
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        momentum = cosine_momentum(
            self.global_step,
            int(self.trainer.estimated_stepping_batches),
            self.base_momentum,
            self.final_momentum,
        )
        ema_update(self.momentum_pairs, momentum)
        self.log("train/momentum", momentum)
