"""What a multi-level method is: the trunk (backbone -> pyramid -> tile head), its montages and its loss; optimiser,
kNN monitor, resume, divergence guard, montage randomness and compilation are parts in modules of their own."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch import nn

from mcl.backbones import Backbone
from mcl.compiling import check_compile_settings, compile_in_place
from mcl.divergence import DivergenceGuard
from mcl.geometry import check_image_size
from mcl.heads import TileHead
from mcl.initialization import check_weight_init, official_trunk_init
from mcl.knn_monitor import KNNMonitor
from mcl.loss import MultiLevelLoss, check_method_loss
from mcl.methods.loading import load_method
from mcl.montage import DOWNSCALE_MODES, assemble_levels, check_levels
from mcl.montage import montage_counts as count_montages
from mcl.montage_streams import MontageStream
from mcl.online_probe import PROBE_NAME, OnlineProbe, OnlineProbeCallback, match_checkpoint, probe_settings
from mcl.optimization import OptimizerFactory, OptimizerSetup, SchedulerFactory
from mcl.pyramid import build_neck
from mcl.resume import ConfiguredOptimizerOnResume

# The validation loaders, in the order the datamodules return them: the labelled kNN bank, the validation split.
BANK_LOADER, VAL_LOADER = 0, 1
# The progress bar's copy of train/loss, logged every log_every_n_steps steps (metrics.json leaves it out).
PROGRESS_BAR_LOSS = "loss"


class MultiLevelModule(pl.LightningModule):
    """Base LightningModule: network trunk, montages and the loss; its parts (optimiser and schedule, kNN monitor,
    resume of optimiser settings, divergence guard) join the Trainer through :meth:`configure_callbacks`.

    Subclasses implement ``training_step`` and take their loss module (:mod:`mcl.loss`) with :meth:`set_loss`.
    Validation batches come from two loaders, the labelled kNN bank (``BANK_LOADER``) and the labelled validation
    split (``VAL_LOADER``); ``validation_step`` returns their pooled features for the kNN monitor.

    ``all_pyramid_maps``: every pyramid map of every image through the tile head, as the released code does
    (:func:`~mcl.cells.all_map_cells`; the same cells, other BatchNorm statistics and cost: docs/parity.md).
    ``channels_last`` and ``compile`` (:meth:`compile_networks` in ``setup("fit")``) change no value, key or file.
    ``online_probe``: a linear classifier on the detached pooled C5, with its own SGD (``online_probe_*``), trained
    on the labelled batches (:mod:`mcl.online_probe`; no part of the model's optimiser or gradients).
    """

    # The loss a subclass builds for its levels when it is given none.
    default_loss: ClassVar[type[MultiLevelLoss]]
    # The data.view_mode a subclass trains on, which says the layout of its training views (mcl.montage.LEVEL_AXIS).
    view_mode: ClassVar[str]

    def __init__(
        self,
        backbone: dict[str, Any],
        neck: dict[str, Any],
        image_size: int = 64,
        levels: int = 3,
        montage_counts: str | Sequence[int] = "paper",
        downscale_mode: str = "nearest",
        head_convs: int = 4,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        lr_reference_batch: int | None = 256,
        no_decay_rule: str = "ndim",
        weight_init: str = "default",
        knn_k: int = 200,
        knn_temperature: float = 0.1,
        max_weight_norm_ratio: float | None = 1.0e4,
        finite_check_every: int = 50,
        seed: int = 0,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str = "default",
        compile_backend: str = "inductor",
        all_pyramid_maps: bool = False,
        online_probe: bool = False,
        online_probe_lr: float = 0.1,
        online_probe_momentum: float = 0.9,
        online_probe_weight_decay: float = 0.0,
    ):
        super().__init__()
        self.levels = check_levels(levels)
        self.image_size = check_image_size(image_size)
        if downscale_mode not in DOWNSCALE_MODES:
            raise ValueError(f"downscale_mode={downscale_mode!r} is invalid: use one of {DOWNSCALE_MODES}")
        self.montage_rule = montage_counts if isinstance(montage_counts, str) else list(montage_counts)
        count_montages(self.montage_rule, 1, levels)
        self.divergence_guard = DivergenceGuard(max_weight_norm_ratio, finite_check_every)
        self._bar_step: int | None = None
        self.downscale_mode = downscale_mode
        self.all_pyramid_maps = bool(all_pyramid_maps)
        self.optimizer_setup = OptimizerSetup(optimizer, scheduler, lr_reference_batch, no_decay_rule)
        self.weight_init = check_weight_init(weight_init)
        self.knn_monitor = KNNMonitor(knn_k, knn_temperature, BANK_LOADER)
        self.seed = seed
        self.montage_stream = MontageStream(seed)
        self.compile_on_fit = compile
        self.compile_settings = (check_compile_settings(compile_mode, compile_backend), compile_backend)
        self.probe_settings = probe_settings(
            online_probe, online_probe_lr, online_probe_momentum, online_probe_weight_decay
        )
        self.online_probe: OnlineProbe | None = None  # built at fit time (OnlineProbeCallback.setup)

        self.backbone = Backbone(**backbone, image_size=image_size, channels_last=channels_last)
        neck = dict(neck)
        self.neck = build_neck(neck.pop("name"), self.backbone.channels, levels=levels, image_size=image_size, **neck)
        self.head = TileHead(self.neck.out_channels, head_convs)
        if self.weight_init == "official":
            official_trunk_init(self.backbone, self.neck, self.head)
        if channels_last:  # the backbone converted its own weights; the neck's and head's convs follow its maps
            self.neck.to(memory_format=torch.channels_last)
            self.head.to(memory_format=torch.channels_last)

    # --------------------------------------------------------------------- loss
    def set_loss(self, loss: MultiLevelLoss | None, kind: type[MultiLevelLoss], choices: str) -> None:
        """``loss`` (``default_loss`` when ``None``) as ``self.loss`` once checked; its config joins the hparams."""
        self.loss = check_method_loss(self.default_loss(self.levels) if loss is None else loss, kind, self, choices)
        self.save_hyperparameters({"loss": self.loss.config()})

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path: str | Path, map_location: Any = "cpu", strict: bool = True, **overrides: Any
    ) -> MultiLevelModule:
        """The model a checkpoint of this library holds (:func:`~mcl.methods.loading.load_method`)."""
        return load_method(cls, checkpoint_path, map_location, strict, **overrides)

    # ----------------------------------------------------------------- montages
    @property
    def generator(self) -> torch.Generator:
        """Montage randomness on the model's device (the CPU for ``meta``), one stream per rank."""
        return self.montage_stream.generator(torch.device("cpu") if self.device.type == "meta" else self.device)

    def seed_montages(self, seed: int | None = None) -> None:
        """Restart the montage draws: from ``seed``, or by default from the run's ``seed`` and this process's rank."""
        self.montage_stream.reseed(seed)

    def build_montages(self, views: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``views`` ``(B, levels, C, H, W)``, one view per level -> per level ``(montages, sources)``."""
        return assemble_levels(views, self.levels, self.montage_rule, self.downscale_mode, self.generator)

    # ------------------------------------------------------------------- speed
    def compiled_modules(self) -> list[nn.Module]:
        """What ``compile`` compiles: backbone and tile head (``None`` parts left out). The neck stays eager: its
        entry point ``forward_levels`` is not ``forward``, and its slicing by per-level counts would specialise."""
        return [module for module in (self.backbone, self.head) if module is not None]

    def compile_networks(self) -> None:  # in place (mcl.compiling.compile_in_place)
        compile_in_place(self.compiled_modules(), *self.compile_settings)

    def setup(self, stage: str) -> None:
        """With ``compile``, compile the networks before fitting (not for ``validate`` or ``test`` alone)."""
        if stage == "fit" and self.compile_on_fit:
            self.compile_networks()

    # -------------------------------------------------------------- validation
    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:  # (B, C5): what the kNN monitor compares
        return self.backbone.forward_pooled(images)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        """The batch's pooled features, which the kNN monitor (and the online probe) collect."""
        return self.pooled_features(batch[0])

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> dict[str, Any]:  # the online probe has its own optimiser
        return self.optimizer_setup.configure(self, self.trainer, exclude=(PROBE_NAME,))

    def configure_callbacks(self) -> list[pl.Callback]:
        probe = [OnlineProbeCallback(self.probe_settings)] if self.probe_settings is not None else []
        return [self.knn_monitor, self.divergence_guard, ConfiguredOptimizerOnResume(self.optimizer_setup), *probe]

    def update_target(self, momentum: float) -> None:
        """After each optimiser step: a momentum target moves towards the online network (``MCL``); else nothing."""

    def log_loss(self, loss: torch.Tensor, logs: dict[str, torch.Tensor]) -> None:
        """Log the step's loss and parts (``train/*``, loggers only) and hand the loss to the divergence guard; the
        progress bar's ``loss`` is a host copy taken every ``log_every_n_steps`` steps (Lightning reads it often)."""
        self.divergence_guard.see_loss(loss)
        self.log("train/loss", loss)
        self.log_dict({f"train/{name}": value for name, value in logs.items()})
        every = self._trainer.log_every_n_steps if self._trainer is not None else 1
        if self.global_step % max(1, every) == 0 and self.global_step != self._bar_step:  # once per step
            self._bar_step = self.global_step
            self.log(PROGRESS_BAR_LOSS, loss.detach().to("cpu", copy=True), prog_bar=True, logger=False)

    # --------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.montage_stream.save(checkpoint, self.device)  # every rank runs this hook (a gather), rank 0 writes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.montage_stream.hold(checkpoint)
        self.divergence_guard.restore(checkpoint)
        match_checkpoint(self, self.probe_settings, checkpoint)  # before the state dict loads

    def on_fit_start(self) -> None:
        self.montage_stream.resume(self.generator.device)
