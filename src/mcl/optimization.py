"""The optimiser and the per-step schedule a multi-level method trains with, built from the ``optimizer`` and
``scheduler`` configs once the Trainer knows the batch and the step counts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from mcl.optim import NO_DECAY_RULES, WarmupCosineLR, check_schedule, parameter_groups, scaled_lr

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class OptimizerSetup:
    """Builds a model's optimiser and schedule for ``configure_optimizers``.

    Args:
        optimizer: a partial optimiser (the ``optimizer`` config group) with ``lr`` for ``lr_reference_batch`` images
            and optionally ``weight_decay``.
        scheduler: a partial scheduler (the ``scheduler`` config group) that takes the optimiser, ``total_steps`` and
            ``steps_per_epoch``; :class:`~mcl.optim.WarmupCosineLR` with its defaults when ``None``.
        lr_reference_batch: the batch ``optimizer.lr`` is given for, scaled linearly to the global batch
            (:func:`~mcl.optim.scaled_lr`); ``None``: no scaling.
        no_decay_rule: which parameters get no weight decay, one of :data:`~mcl.optim.NO_DECAY_RULES`.

    ``configured_groups`` keeps the settings of each parameter group it built (all but the parameters), which a
    resume applies over the checkpoint's (:class:`~mcl.resume.ConfiguredOptimizerOnResume`).
    """

    def __init__(
        self,
        optimizer: OptimizerFactory | None,
        scheduler: SchedulerFactory | None = None,
        lr_reference_batch: int | None = 256,
        no_decay_rule: str = "ndim",
    ):
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler or partial(WarmupCosineLR)
        check_schedule(**self.scheduler_factory.keywords)  # now rather than when training starts
        if no_decay_rule not in NO_DECAY_RULES:
            raise ValueError(f"no_decay_rule={no_decay_rule!r} is invalid: use one of {NO_DECAY_RULES}")
        self.lr_reference_batch = lr_reference_batch
        self.no_decay_rule = no_decay_rule
        self.configured_groups: list[dict[str, Any]] = []

    def configure(self, model: nn.Module, trainer: Any, exclude: Sequence[str] = ()) -> dict[str, Any]:
        """The optimiser over ``model``'s parameter groups at the lr scaled to ``trainer``'s global batch, and the
        schedule stepped every optimiser step over ``trainer.estimated_stepping_batches``, as Lightning takes them.
        ``exclude``: child modules of ``model`` left out of the optimiser (:func:`~mcl.optim.parameter_groups`)."""
        if self.optimizer_factory is None:
            raise ValueError("optimizer is not set: pass a partial optimizer (e.g. the optimizer config group)")
        base_lr = self.optimizer_factory.keywords.get("lr")
        weight_decay = self.optimizer_factory.keywords.get("weight_decay", 0.0)
        if base_lr is None:
            raise ValueError("optimizer.lr is not set")
        lr = scaled_lr(base_lr, global_batch_size(trainer), self.lr_reference_batch)
        optimizer = self.optimizer_factory(parameter_groups(model, weight_decay, self.no_decay_rule, exclude), lr=lr)
        total_steps = max(1, int(trainer.estimated_stepping_batches))
        steps_per_epoch = total_steps / max(1, trainer.max_epochs or 1)
        schedule = self.scheduler_factory(optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        self.configured_groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def forward_batch_size(trainer: Any) -> int | None:
    """Images per forward pass over every device: the datamodule's ``batch_size`` x devices (``None`` when the
    Trainer has no datamodule that says). The one place a model reads the data's batch size."""
    per_device = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
    return None if per_device is None else per_device * trainer.world_size


def global_batch_size(trainer: Any) -> int:
    """Images per optimiser step over every device: :func:`forward_batch_size` x gradient accumulation."""
    images = forward_batch_size(trainer)
    if images is None:
        raise RuntimeError("the datamodule must expose batch_size to scale the learning rate")
    return images * trainer.accumulate_grad_batches
