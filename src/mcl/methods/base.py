"""What the self-supervised and supervised multi-level methods share: the montage -> backbone -> pyramid -> tile
head path, the optimiser and schedule, the kNN monitor and the checks on their configuration."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch import nn

from mcl.backbones import Backbone
from mcl.checkpoints import LastCheckpoint, check_current_layout, load_checkpoint
from mcl.distributed import gather_batch, rank, world_size
from mcl.geometry import cell_count, check_image_size, grid_side
from mcl.guards import FiniteGuard
from mcl.heads import TileHead, split_tiles
from mcl.initialization import check_weight_init, official_trunk_init
from mcl.knn import KNNAccuracy
from mcl.loss import MultiLevelLoss, build_loss
from mcl.montage import DOWNSCALE_MODES, assemble_levels, check_levels
from mcl.montage import montage_counts as count_montages
from mcl.optim import NO_DECAY_RULES, WarmupCosineLR, check_schedule, parameter_groups, scaled_lr
from mcl.pyramid import build_neck

log = logging.getLogger(__name__)
OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]
# The validation loaders, in the order the datamodules return them: the labelled kNN bank, the validation split.
BANK_LOADER, VAL_LOADER = 0, 1
DEFAULT_LEVELS = 3
# The progress bar's copy of train/loss, logged every log_every_n_steps steps (metrics.json leaves it out).
PROGRESS_BAR_LOSS = "loss"
# Checkpoint key of the montage generators' states, one row per rank.
GENERATOR_STATES = "montage_generator_states"
# torch.compile's inductor modes (``compile_mode``); "default" passes no mode.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def montage_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a rank's montage stream: a run's ``seed`` and the process's ``rank`` at the start, and the
    ``step`` when a resume has to derive it anew (:meth:`MultiLevelModule.restore_generator`). Below 2**32: the CPU
    generator keeps only the lower 32 bits of a seed."""
    if step == 0:
        return seed * 1_000_003 + rank
    return int.from_bytes(hashlib.blake2b(f"{seed},{rank},{step}".encode(), digest_size=4).digest(), "little")


def check_compile_settings(compile_mode: str, compile_backend: str) -> str:
    """Return ``compile_mode`` once it and ``compile_backend`` name a ``torch.compile`` mode and backend that go
    together; checked whether or not ``compile`` is on, so a bad value fails before a run rather than when it
    first trains."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={compile_mode!r} is invalid: use one of {COMPILE_MODES}")
    if compile_backend != "inductor":
        from torch._dynamo import list_backends  # only for another backend: the default need not import dynamo

        backends = list_backends(exclude_tags=())
        if compile_backend not in backends:
            raise ValueError(
                f"compile_backend={compile_backend!r} is invalid: use inductor (the default), or e.g. eager or "
                f"aot_eager to tell a compiler problem from a tracing one; torch knows {backends}"
            )
        if compile_mode != "default":
            raise ValueError(
                f"compile_mode={compile_mode!r} needs compile_backend=inductor (the modes are inductor's), not "
                f"{compile_backend!r}; use compile_mode=default with another backend"
            )
    return compile_mode


def level_cells(
    images: Sequence[torch.Tensor],
    backbone: Backbone,
    neck: nn.Module,
    head: TileHead,
    embedded_levels: int | None = None,
    head_per_level: bool = True,
) -> list[torch.Tensor]:
    """Embed every cell of montages grouped by level, with one backbone pass over all of them.

    Args:
        images: per level ``i = 0, 1, ...``, ``(M_i, C, H, W)`` montages (level 0: plain views); all share ``H x W``.
            They share the backbone's BatchNorm statistics; the neck's are shared by the images that need each map.
        embedded_levels: embed only levels ``0..embedded_levels-1``; the others still take part in the backbone's
            statistics (the released code's target network sees the montages but keeps only level 0). All by default.
        head_per_level: one head call per level (BatchNorm statistics per level, as the released code's head runs
            per pyramid level) or one call over the tiles of all levels.

    Returns:
        Per embedded level, ``(M_i * 4**i, head channels)`` cell features in ``sources.flatten()`` order.
    """
    features = backbone(torch.cat(list(images)))
    counts = [len(level_images) for level_images in images[:embedded_levels]]
    maps = neck.forward_levels([f[: sum(counts)] for f in features], counts)
    tiles = [split_tiles(level_map, grid_side(level)) for level, level_map in enumerate(maps)]
    if head_per_level:
        return [head(level_tiles) for level_tiles in tiles]
    return list(head(torch.cat(tiles)).split([len(t) for t in tiles]))


def all_map_cells(
    images: Sequence[torch.Tensor], backbone: Backbone, neck: nn.Module, head: TileHead
) -> list[torch.Tensor]:
    """Embed every tile of every pyramid map of every image, as the released code does (``all_pyramid_maps``).

    Args:
        images: per level ``i = 0, 1, ...``, ``(M_i, C, H, W)`` montages (level 0: plain views); all share ``H x W``.
            One backbone pass over all ``N = sum(M_i)`` of them.

    Returns:
        Per level ``i``, ``(N * 4**i, head channels)``: the head features of level ``i``'s map (``P(5-i)`` with the
        FPN) of all ``N`` images, each map cut into level ``i``'s ``2**i x 2**i`` grid, image by image
        (``sources.flatten()`` order within each).
        The neck computes every map of every image (``neck.forward_all``) and the head runs once per map over all of
        its tiles, the finest map first (the released head's order, which fixes how its running statistics are
        updated). :func:`own_cells` keeps the cells the loss reads.
    """
    maps = neck.forward_all(backbone(torch.cat(list(images))), len(images))
    cells: dict[int, torch.Tensor] = {}
    for level in reversed(range(len(maps))):
        cells[level] = head(split_tiles(maps[level], grid_side(level)))
    return [cells[level] for level in range(len(maps))]


def own_cells(per_map: Sequence[torch.Tensor], counts: Sequence[int]) -> list[torch.Tensor]:
    """Per level ``i < len(counts)``, the rows of level ``i``'s own images in ``per_map[i]``.

    Args:
        per_map: per level ``i``, ``(N * 4**i, ...)`` rows of all ``N`` images (as :func:`all_map_cells` returns
            them), the images ordered by level.
        counts: images per level, ``M_0, M_1, ...`` (fewer than the levels of ``per_map`` to keep the first ones).

    Returns:
        Per level ``i``, ``(M_i * 4**i, ...)``: the same cells as :func:`level_cells` gives, in the same order.
    """
    kept, start = [], 0
    for level, count in enumerate(counts):
        cells = cell_count(level)
        kept.append(per_map[level][start * cells : (start + count) * cells])
        start += count
    return kept


class MultiLevelModule(pl.LightningModule):
    """Base LightningModule: network trunk, montages, optimisation and the kNN monitor.

    Subclasses implement ``training_step`` and take their loss module (:mod:`mcl.loss`) with :meth:`set_loss`.
    Validation batches come from two loaders: the labelled kNN bank (``dataloader_idx=BANK_LOADER``) and the
    labelled validation split (``dataloader_idx=VAL_LOADER``); the :class:`~mcl.knn.KNNAccuracy` submodule ``knn``
    collects their pooled features and gives ``val/knn_top1``.

    ``all_pyramid_maps``: compute every pyramid map of every image, the tile head once per map over all of them
    (:func:`all_map_cells`), as the released code does, instead of only the map each level reads
    (:func:`level_cells`). The cells that enter the loss are the same; which samples each BatchNorm of the neck and
    head normalises over in train mode, and the cost, differ (see docs/parity.md). No effect without a pyramid
    (the supervised method's ``classifier_input=pooled_c5``).

    Two speed options leave the computation, the state-dict keys and the checkpoints as they are:

    - ``channels_last``: backbone, neck and tile head keep their conv weights in ``torch.channels_last`` memory
      format, and the backbone makes its input images (plain views and montages) channels-last. A subclass's
      networks built from them by ``copy.deepcopy`` (MCL's target) keep the format.
    - ``compile``: :meth:`compile_networks` compiles the :meth:`compiled_modules` in place with
      ``nn.Module.compile`` (``compile_mode``, ``compile_backend``) when training starts (``setup("fit")``), not
      here: a model built to export, to probe or to count FLOPs on ``meta`` tensors stays eager and cheap.
    """

    # The loss a subclass builds for its levels when it is given none.
    default_loss: ClassVar[type[MultiLevelLoss]]

    def __init__(
        self,
        backbone: dict[str, Any],
        neck: dict[str, Any],
        image_size: int = 64,
        levels: int = DEFAULT_LEVELS,
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
    ):
        super().__init__()
        self.levels = check_levels(levels)
        self.image_size = check_image_size(image_size)
        if downscale_mode not in DOWNSCALE_MODES:
            raise ValueError(f"downscale_mode={downscale_mode!r} is invalid: use one of {DOWNSCALE_MODES}")
        self.montage_rule = montage_counts if isinstance(montage_counts, str) else list(montage_counts)
        count_montages(self.montage_rule, 1, levels)
        if max_weight_norm_ratio is not None and max_weight_norm_ratio <= 1:
            raise ValueError(f"max_weight_norm_ratio={max_weight_norm_ratio} is invalid: use a number > 1 or null")
        self.max_weight_norm_ratio = max_weight_norm_ratio
        self.finite_guard = FiniteGuard(finite_check_every)
        self._bar_step: int | None = None
        self._initial_weight_norm: float | None = None
        self.downscale_mode = downscale_mode
        self.all_pyramid_maps = bool(all_pyramid_maps)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler or partial(WarmupCosineLR)
        check_schedule(**self.scheduler_factory.keywords)  # now rather than when training starts
        self.lr_reference_batch = lr_reference_batch
        if no_decay_rule not in NO_DECAY_RULES:
            raise ValueError(f"no_decay_rule={no_decay_rule!r} is invalid: use one of {NO_DECAY_RULES}")
        self.no_decay_rule = no_decay_rule
        self.weight_init = check_weight_init(weight_init)
        self.knn = KNNAccuracy(knn_k, knn_temperature)
        self.seed = seed
        self.compile_on_fit = compile
        self.compile_mode = check_compile_settings(compile_mode, compile_backend)
        self.compile_backend = compile_backend

        self.backbone = Backbone(**backbone, image_size=image_size, channels_last=channels_last)
        neck = dict(neck)
        self.neck = build_neck(neck.pop("name"), self.backbone.channels, levels=levels, image_size=image_size, **neck)
        self.head = TileHead(self.neck.out_channels, head_convs)
        if self.weight_init == "official":
            official_trunk_init(self.backbone, self.neck, self.head)
        self.channels_last = channels_last
        if channels_last:
            # The backbone converted its own weights; the neck's and the head's convs follow its feature maps.
            self.neck.to(memory_format=torch.channels_last)
            self.head.to(memory_format=torch.channels_last)
        self._generator: torch.Generator | None = None
        self._montage_seed: int | None = None

    # --------------------------------------------------------------------- loss
    def set_loss(self, loss: MultiLevelLoss | None, kind: type[MultiLevelLoss], choices: str) -> None:
        """Take ``loss`` (``default_loss`` for this model's levels when ``None``) as ``self.loss``, once it is a
        ``kind`` built for the same levels; ``choices`` names the ``loss`` configs that build one. The loss's
        :meth:`~mcl.loss.MultiLevelLoss.config` joins the hyper-parameters in place of the module (call this after
        ``save_hyperparameters(ignore=[..., "loss"])``)."""
        loss = self.default_loss(self.levels) if loss is None else loss
        if not isinstance(loss, kind):
            raise ValueError(
                f"{type(self).__name__} needs a {kind.__name__} loss ({choices}), not a {type(loss).__name__}"
            )
        if loss.levels != self.levels:
            raise ValueError(
                f"loss.levels={loss.levels} but levels={self.levels}: the loss weighs one term per montage level, so "
                "build it for the model's levels (the loss configs interpolate ${levels})"
            )
        self.loss = loss
        self.save_hyperparameters({"loss": loss.config()})

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path: str | Path, map_location: Any = "cpu", strict: bool = True, **overrides: Any
    ) -> MultiLevelModule:
        """The model a checkpoint of this library holds, read with ``weights_only=True`` (to ``map_location``, where
        the model then lives), its loss rebuilt from the saved config; ``overrides`` replace saved hyper-parameters.
        A checkpoint of a layout this version does not read is refused
        (:func:`mcl.checkpoints.check_current_layout`)."""
        checkpoint = load_checkpoint(checkpoint_path, map_location)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        check_current_layout(hparams, checkpoint_path)
        loss = hparams.pop("loss", None)
        if loss is not None:
            loss = build_loss({"levels": hparams.get("levels", DEFAULT_LEVELS), **loss})
        model = cls(**{**hparams, "loss": loss, **overrides})
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=strict)
        device = next((t.device for t in checkpoint["state_dict"].values() if isinstance(t, torch.Tensor)), None)
        return model.to(device) if device is not None else model

    # ----------------------------------------------------------------- montages
    @property
    def generator(self) -> torch.Generator:
        """Montage randomness, on the model's device, one stream per rank; see :meth:`seed_montages`."""
        device = torch.device("cpu") if self.device.type == "meta" else self.device  # meta: FLOP counting
        if self._generator is None or self._generator.device != device:
            seed = montage_seed(self.seed, rank()) if self._montage_seed is None else self._montage_seed
            self._generator = torch.Generator(device=device).manual_seed(seed)
        return self._generator

    def seed_montages(self, seed: int | None = None) -> None:
        """Restart the montage draws: from ``seed``, or by default from the run's ``seed`` and this process's rank
        (so that ranks draw independent cell orders). Montages built after two calls with the same ``seed`` agree."""
        self._montage_seed = seed
        self._generator = None

    def build_montages(self, views: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``views`` ``(B, levels, C, H, W)``, one view per level -> per level ``(montages, sources)``."""
        return assemble_levels(views, self.levels, self.montage_rule, self.downscale_mode, self.generator)

    def check_views(self, views: torch.Tensor, level_axis: int) -> None:
        """Fail early when the data's views do not match the model (count per side, size)."""
        if views.shape[level_axis] != self.levels:
            raise ValueError(
                f"the batch has {views.shape[level_axis]} views per side but levels={self.levels}; "
                "set data.views_per_side to the level count (the default configs interpolate it)"
            )
        if views.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"batch views are {views.shape[-2]}x{views.shape[-1]} but the model was built for "
                f"image_size={self.image_size}; set data.image_size and image_size alike"
            )

    # ------------------------------------------------------------------- speed
    def compiled_modules(self) -> list[nn.Module]:
        """The submodules ``compile`` compiles: backbone and tile head, the network parts a training step calls as
        modules (``None`` parts, e.g. the head under ``classifier_input=pooled_c5``, are left out).

        The neck is not among them: its entry point is ``forward_levels``, not ``forward``, which
        ``nn.Module.compile`` does not reach, and its Python slicing by per-level image counts would specialise a
        graph on every count; it stays eager between the compiled backbone and head.
        """
        return [module for module in (self.backbone, self.head) if module is not None]

    def compile_networks(self) -> None:
        """Compile every module of :meth:`compiled_modules`, each on its own and in place (``nn.Module.compile``).

        In place, the modules keep their parameters and names: state-dict keys and checkpoints are those of the
        eager model (no ``_orig_mod.`` prefix), optimisers and the EMA update act on the same tensors, and a deep
        copy or pickle of a module is its eager version (``nn.Module`` drops the compiled call from its state).
        Compilation itself is lazy: it happens at each module's first call, for the shapes and modes it meets.
        ``dynamic`` is left to torch (``None``): a module compiles once for the shapes of its first call, and one
        that meets another batch size (the validation batches, the target network's batch under
        ``bn_groups=joint``) recompiles once with a dynamic batch dimension rather than once per size. A module
        compiled already is left as it is, so calling this again does nothing (and on a deep copy of a compiled
        model, whose modules are eager, compiles them).
        """
        mode = None if self.compile_mode == "default" else self.compile_mode
        for module in self.compiled_modules():
            if module._compiled_call_impl is None:
                module.compile(mode=mode, backend=self.compile_backend)

    def setup(self, stage: str) -> None:
        """With ``compile``, compile the networks before fitting (not for ``validate`` or ``test`` alone)."""
        if stage == "fit" and self.compile_on_fit:
            self.compile_networks()

    # ---------------------------------------------------------------- features
    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen-backbone features for the kNN monitor: pooled C5, ``(B, C5)``."""
        return self.backbone.forward_pooled(images)

    # -------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self.knn.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        images, labels = batch
        self.knn.update(self.pooled_features(images), labels, bank=dataloader_idx == BANK_LOADER)

    def on_validation_epoch_end(self) -> None:
        # Without both loaders (e.g. a validate call on one of them) there is nothing to score.
        if self.knn.has_bank_and_queries:
            # The metric gathers every rank's features, so every rank logs the same value (checkpointing needs it on
            # all of them).
            self.log("val/knn_top1", self.knn.compute(), prog_bar=True)
        self.knn.reset()

    # ------------------------------------------------------------ optimisation
    def global_batch_size(self) -> int:
        trainer = self.trainer
        per_device = getattr(trainer.datamodule, "batch_size", None)
        if per_device is None:
            raise RuntimeError("the datamodule must expose batch_size to scale the learning rate")
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("optimizer is not set: pass a partial optimizer (e.g. the optimizer config group)")
        base_lr = self.optimizer_factory.keywords.get("lr")
        weight_decay = self.optimizer_factory.keywords.get("weight_decay", 0.0)
        if base_lr is None:
            raise ValueError("optimizer.lr is not set")
        lr = scaled_lr(base_lr, self.global_batch_size(), self.lr_reference_batch)
        optimizer = self.optimizer_factory(parameter_groups(self, weight_decay, self.no_decay_rule), lr=lr)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        schedule = self.scheduler_factory(optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        self._configured_groups = [
            {k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups
        ]
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_start(self) -> None:
        """On resume, apply the config's optimiser hyper-parameters and lr rather than the checkpoint's (Lightning
        restores the optimizer's and scheduler's saved values), and say which changed."""
        configured = getattr(self, "_configured_groups", None)
        if not configured or self.trainer.ckpt_path is None:
            return
        changes: set[str] = set()
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            optimizer = scheduler.optimizer
            for index, (group, wanted) in enumerate(zip(optimizer.param_groups, configured, strict=True)):
                for key, value in wanted.items():
                    if key in ("lr", "buffer_lr") or group.get(key) == value:
                        continue
                    if key == "initial_lr":
                        changes.add(f"lr {group[key]:g} -> {value:g}")
                        scheduler.base_lrs[index] = value
                    else:
                        changes.add(f"{key} {group.get(key)} -> {value}")
                    group[key] = value
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                lrs = [
                    base * fn(scheduler.last_epoch)
                    for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
                ]
                for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                    group["lr"] = lr
                scheduler._last_lr = lrs
        if changes:
            log.warning(
                "resumed with other optimiser settings than the checkpoint's; applying: %s", ", ".join(sorted(changes))
            )

    def log_loss(self, loss: torch.Tensor, logs: dict[str, torch.Tensor]) -> None:
        """Log the step's loss and its parts, and hand the loss to the :class:`~mcl.guards.FiniteGuard`.

        Lightning turns every progress-bar value into a Python number at every step, which waits for the device; so
        the bar shows ``loss``, a host copy of the loss taken every ``trainer.log_every_n_steps`` steps (one sync
        then), and ``train/*`` go to the loggers only (Lightning reads them when it writes its logs, every
        ``log_every_n_steps`` steps)."""
        self.finite_guard.see_loss(loss)
        self.log("train/loss", loss)
        self.log_dict({f"train/{name}": value for name, value in logs.items()})
        every = self._trainer.log_every_n_steps if self._trainer is not None else 1
        if self.global_step % max(1, every) == 0 and self.global_step != self._bar_step:  # once per step
            self._bar_step = self.global_step
            self.log(PROGRESS_BAR_LOSS, loss.detach().to("cpu", copy=True), prog_bar=True, logger=False)

    # ------------------------------------------------------------- divergence
    def saved_state_note(self) -> str:
        """Which checkpoint holds good weights: the run's ``last.ckpt`` and its step, if one was written."""
        callbacks = self._trainer.callbacks if self._trainer is not None else []
        last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
        if last is None or not last.path.is_file():
            return "No checkpoint of this run was written."
        step = load_checkpoint(last.path).get("global_step")
        return (
            f"The newest checkpoint, {last.path} (step {step}), was written before this and passed the weight check; "
            "resume from it with ckpt_path=... and the new settings (they apply on resume)."
        )

    def weight_norm(self) -> float:
        """The L2 norm of all trainable weights (one host sync)."""
        weights = [p.detach().float() for p in self.parameters() if p.requires_grad]
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(weights))))

    def check_weights(self) -> None:
        """Raise if the weights are non-finite or their norm grew past ``max_weight_norm_ratio`` x its initial value."""
        norm = self.weight_norm()
        initial, ratio = self._initial_weight_norm, self.max_weight_norm_ratio
        finite = math.isfinite(norm)
        if finite and (ratio is None or initial is None or norm <= ratio * initial):
            return
        growth = f"{norm:.3g}, {norm / initial:.3g}x its initial {initial:.3g}" if finite and initial else f"{norm}"
        raise FloatingPointError(
            f"the weights diverged at global step {self.global_step}: their norm is {growth} (limit "
            f"method.max_weight_norm_ratio={ratio}); this state was not saved. {self.saved_state_note()} "
            "Lower optimizer.lr or raise scheduler.warmup_epochs."
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep non-finite gradients out of the weights, without a host sync (:class:`~mcl.guards.FiniteGuard`); under
        fp16 loss scaling, whose scaler skips steps with non-finite gradients itself, only a non-finite loss is
        recorded."""
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        gradients = (p.grad for p in self.parameters() if p.grad is not None)
        self.finite_guard.mask_gradients(gradients, self.global_step, loss_only=scaled)

    def check_finite(self) -> None:
        """Stop if a step since the start was non-finite (its gradient was discarded); one host sync."""
        found = self.finite_guard.first_bad_step()
        if found is None:
            return
        step, what = found
        raise FloatingPointError(
            f"non-finite {what} at global step {step}: that step's gradient was discarded on the device (the weights "
            f"stayed finite) and the run stopped at step {self.global_step}, when the guard was read "
            f"(method.finite_check_every={self.finite_guard.check_every}). {self.saved_state_note()} Lower "
            "optimizer.lr, raise scheduler.warmup_epochs or use 32-bit precision (trainer.precision=32-true)."
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.finite_guard.due(self.global_step):
            self.check_finite()

    def on_train_epoch_end(self) -> None:
        self.check_finite()
        self.check_weights()

    def on_train_end(self) -> None:
        self.check_finite()

    # ----------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Never save weights after a non-finite step or diverged ones; keep every rank's montage generator state
        (gathered from all ranks: every rank runs this hook, rank 0 writes the file) and the initial weight norm."""
        self.check_finite()
        self.check_weights()
        checkpoint[GENERATOR_STATES] = gather_batch(self.generator.get_state().to(self.device).unsqueeze(0)).cpu()
        checkpoint["initial_weight_norm"] = self._initial_weight_norm

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_generator_states = (checkpoint.get(GENERATOR_STATES), int(checkpoint.get("global_step", 0)))
        self._initial_weight_norm = checkpoint.get("initial_weight_norm", self._initial_weight_norm)

    def on_fit_start(self) -> None:
        if self._initial_weight_norm is None:
            self._initial_weight_norm = self.weight_norm()
        pending = getattr(self, "_pending_generator_states", None)
        if pending is not None:
            self._pending_generator_states = None
            self.restore_generator(*pending)

    def restore_generator(self, states: torch.Tensor | None, step: int) -> None:
        """Continue this rank's montage stream from a checkpoint's ``states`` (one row per rank that saved it). Saved
        by another number of ranks (or on another device type, or not at all), each rank's stream is derived anew from
        ``(seed, rank, step)`` instead, with a warning: independent across ranks, but not the draws an uninterrupted
        run would have made."""
        here, ranks = rank(), world_size()
        generator = self.generator
        if states is not None and len(states) == ranks and states[here].numel() == generator.get_state().numel():
            generator.set_state(states[here].clone())
            return
        why = (
            "the checkpoint has none"
            if states is None
            else f"it holds {len(states)} rank(s)' states for {ranks} rank(s) now"
            if len(states) != ranks
            else "they were saved on another device type"
        )
        log.warning(
            "montage generators restarted from (seed, rank, step=%d) on resume: %s; the ranks' cell layouts stay "
            "independent but differ from those of an uninterrupted run",
            step,
            why,
        )
        generator.manual_seed(montage_seed(self.seed, here, step))
