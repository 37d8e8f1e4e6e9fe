"""MCL: self-supervised multi-level contrastive pretraining against a momentum target."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from mcl.backbones import Backbone
from mcl.heads import MLP, TileHead
from mcl.initialization import official_embedding_init
from mcl.loss import MultiLevelContrastiveLoss, MultiLevelInfoNCE
from mcl.methods.base import MultiLevelModule
from mcl.methods.bn_groups import build_grouping
from mcl.momentum import cosine_momentum, ema_update, make_target
from mcl.montage import check_views
from mcl.online_probe import LevelZeroFeatures, level_zero_features, train_probe
from mcl.optimization import forward_batch_size
from mcl.sides import SIDES, BySideLevel, SideMontages, cell_sources, montage_images


class Network(NamedTuple):
    """The modules that embed a cell: the online network's, or their EMA copies in the target network."""

    backbone: Backbone
    neck: nn.Module
    head: TileHead
    projector: nn.Module

    @property
    def trunk(self) -> tuple[Backbone, nn.Module, TileHead]:
        return self.backbone, self.neck, self.head


class MCL(MultiLevelModule):
    """Online network (backbone -> pyramid -> tile head -> projector -> per-level predictor) against an EMA target.

    A training batch is ``(views, labels)`` with ``views`` ``(B, 2, levels, C, H, W)``: for each augmentation side,
    one view per level. The loss ignores the labels (only the online probe, ``online_probe=true``, reads them).
    ``loss`` is a :class:`~mcl.loss.MultiLevelContrastiveLoss` built for ``levels`` (the ``loss`` config group:
    ``infonce``, ``byol``; :class:`~mcl.loss.MultiLevelInfoNCE` with its defaults when ``None``): it holds the level
    weights, the temperature and the target assignment. Keyword arguments not listed here go to
    :class:`MultiLevelModule`.

    ``bn_groups`` chooses which samples share BatchNorm statistics (train mode) in the online and target passes:

    - ``per_side`` (the released code): each augmentation side on its own. Backbone and neck see that side's plain
      views and montages of all levels together; head and projector run per (side, level), predictors per
      (side, level). The target network runs the same way, so its backbone statistics include the montages
      (about 1.31x the backbone cost of plain views only at 3 levels), and keeps the level-0 embeddings.
    - ``per_side_plain_target``: the online pass as ``per_side``; the target embeds each side's plain views only.
    - ``joint``: one backbone pass over both sides and all levels, one head and one projector call over all cells,
      each predictor over both sides; the target embeds both sides' plain views together. Fewest kernel launches.

    ``all_pyramid_maps`` (needs ``bn_groups=per_side``) makes both networks compute what the released code computes
    rather than only what the loss reads: per side, the neck builds every pyramid map of every image (plain views and
    montages of all levels), and the tile head and the projector run once per map over the tiles of all those images
    (finest map first), each map cut into the grid of the level that reads it; each level then keeps its own images'
    rows of its own map. The embeddings that enter the loss are the same cells as without it; what changes is which
    samples each BatchNorm of the neck, head and projector normalises over (and the running statistics it keeps).
    See :class:`~mcl.methods.bn_groups.PerSideAllMaps` and docs/parity.md for what it costs.
    """

    default_loss = MultiLevelInfoNCE
    view_mode = "byol"

    def __init__(
        self,
        *args: Any,
        loss: MultiLevelContrastiveLoss | None = None,
        bn_groups: str = "per_side",
        projector_hidden_dim: int = 2048,
        embedding_dim: int = 256,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "loss"])
        self.set_loss(loss, MultiLevelContrastiveLoss, "loss=infonce or loss=byol")
        self.grouping = build_grouping(bn_groups, self.all_pyramid_maps)
        assignment = self.loss.assignment
        if bn_groups == "per_side_plain_target" and assignment.reads_montages:
            raise ValueError(
                f"bn_groups=per_side_plain_target needs loss.target_assignment=top: with {assignment.name!r} the "
                "target network embeds the montages themselves; use bn_groups=per_side"
            )
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(
                f"base_momentum={base_momentum}, final_momentum={final_momentum} are invalid: "
                "they need 0 <= base_momentum <= final_momentum <= 1"
            )
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum
        channels = self.neck.out_channels
        self.projector = MLP(channels, projector_hidden_dim, embedding_dim, final_norm=True)
        self.predictors = nn.ModuleList(
            MLP(embedding_dim, projector_hidden_dim, embedding_dim) for _ in range(self.levels)
        )
        if self.weight_init == "official":
            official_embedding_init(self.projector, self.predictors)
        self.target_backbone = make_target(self.backbone)
        self.target_neck = make_target(self.neck)
        self.target_head = make_target(self.head)
        self.target_projector = make_target(self.projector)

    @property
    def online(self) -> Network:
        return Network(self.backbone, self.neck, self.head, self.projector)

    @property
    def target(self) -> Network:
        return Network(self.target_backbone, self.target_neck, self.target_head, self.target_projector)

    @property
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The ``(online, target)`` modules that the EMA update ties together; the predictors have no target."""
        return list(zip(self.online, self.target, strict=True))

    def compiled_modules(self) -> list[nn.Module]:
        """Backbone, tile head and projector of both networks, and the predictors; each compiles on its own. The
        target's modules are deep copies made in ``__init__``, before any compilation (a copy of a compiled module
        would be eager), and the EMA update reaches their parameters as before. The necks stay eager (see
        :meth:`MultiLevelModule.compiled_modules`)."""
        online, target = self.online, self.target
        return [
            online.backbone,
            online.head,
            online.projector,
            *self.predictors,
            target.backbone,
            target.head,
            target.projector,
        ]

    # ------------------------------------------------------------------ passes
    def embed(
        self,
        network: Network,
        images: list[list[torch.Tensor]],
        embedded_levels: int | None = None,
        pooled: list[torch.Tensor] | None = None,
    ) -> BySideLevel:
        """Projector embeddings of every cell of ``images[side][level]`` ``(M, C, H, W)`` (montages, or plain views
        at level 0), keyed by ``(side, level)``, grouped as ``bn_groups`` says (:mod:`mcl.methods.bn_groups`);
        ``pooled`` receives the level-0 images' detached pooled C5."""
        return self.grouping.embed(network, images, embedded_levels, pooled)

    def online_pass(self, montages: list[SideMontages], level_zero: LevelZeroFeatures | None = None) -> BySideLevel:
        """The online network on both sides' montages.

        Args:
            montages: ``montages[side]`` from :meth:`build_montages`: per level, ``(montages (M, C, H, W),
                sources (M, 2**level, 2**level))``.
            level_zero: for the online probe, receives the detached pooled C5 of both sides' level-0 montages (each
                view once, whole) and their batch indices, side 0's first; ``None``: nothing is taken.

        Returns:
            ``{(side, level): predictions}`` for both sides and every level, ``(M * 4**level, embedding_dim)``: the
            level's predictor applied to every cell, in ``sources.flatten()`` order.
        """
        pooled = None
        if level_zero is not None:
            level_zero.sources.extend(side_montages[0][1].flatten() for side_montages in montages)
            pooled = level_zero.pooled
        embeddings = self.embed(self.online, montage_images(montages), pooled=pooled)
        return self.grouping.predict(self.predictors, embeddings)

    @torch.no_grad()
    def target_pass(self, views: torch.Tensor, montages: list[SideMontages]) -> tuple[BySideLevel, BySideLevel | None]:
        """The target network (no gradient) on both sides, for the loss's target assignment
        (:meth:`~mcl.targets.TargetAssignment.targets`: ``{(side, j): targets}``, ``(B, embedding_dim)`` per side and
        target level ``j``, and beyond ``top`` the ``(B,)`` masks of the images present at level ``j``).

        Args:
            views: ``(B, 2, levels, C, H, W)``, the batch the montages were built from.
            montages: as :meth:`online_pass` takes them.

        Under ``top`` whether the montages join the plain views' backbone statistics follows ``bn_groups``. The
        target stays in train mode: BatchNorm uses batch statistics, as in BYOL.
        """

        def embed(images: list[list[torch.Tensor]], embedded_levels: int | None) -> BySideLevel:
            return self.embed(self.target, images, embedded_levels)

        in_batch = self.grouping.montages_in_target_batch
        return self.loss.assignment.targets(embed, views, montages, montages_in_batch=in_batch)

    def forward_losses(
        self, views: torch.Tensor, level_zero: LevelZeroFeatures | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and per-level logs for ``views`` ``(B, 2, levels, C, H, W)``; ``level_zero``: see
        :meth:`online_pass`."""
        check_views(views, self.levels, self.image_size, self.view_mode)
        montages = [self.build_montages(views[:, side]) for side in SIDES]
        predictions = self.online_pass(montages, level_zero)
        targets, present = self.target_pass(views, montages)
        return self.loss(predictions, cell_sources(montages), targets, present)

    def update_target(self, momentum: float) -> None:
        """The EMA update of the target networks: ``target = momentum * target + (1 - momentum) * online``."""
        ema_update(self.momentum_pairs, momentum)

    def setup(self, stage: str) -> None:
        """Refuse a global batch of one image: InfoNCE against a single target is 0 and nothing would train. Then
        compile the networks when ``compile`` asks (:meth:`MultiLevelModule.setup`)."""
        images = forward_batch_size(self.trainer)
        if stage == "fit" and images is not None and images < 2:
            raise ValueError(
                f"batch_size={images // self.trainer.world_size} on {self.trainer.world_size} device(s) gives one "
                "target per step: the contrastive loss is then 0 and nothing trains; use a global batch of at least 2 "
                "(in practice 64 or more)"
            )
        super().setup(stage)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The loss of the batch's views (its labels are read by the online probe only, when there is one)."""
        views, labels = batch
        level_zero = level_zero_features(self)
        loss, logs = self.forward_losses(views, level_zero)
        self.log_loss(loss, logs)
        train_probe(self, level_zero, labels)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        momentum = cosine_momentum(
            self.global_step,
            int(self.trainer.estimated_stepping_batches),
            self.base_momentum,
            self.final_momentum,
        )
        self.update_target(momentum)
        # A CPU tensor: a Python float would be copied to the device at every step, which waits for it.
        self.log("train/momentum", torch.tensor(momentum, dtype=torch.float32))
