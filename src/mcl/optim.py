"""Optimiser parameter groups, LARS with the released code's momentum rule, and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.optim import Lars as TimmLars
from torch import nn

NO_DECAY_RULES = ("ndim", "official")
SCHEDULE_SHAPES = ("official", "warmup_then_cosine")
# The released code excludes parameters by the regexes ``(bn|gn)(\d+)?.(weight|bias)`` and ``bias``. They miss the
# BatchNorm weights of the residual shortcuts (``downsample.1``) and of the projector's and predictors' MLPs, which
# therefore keep weight decay and the LARS trust ratio there.
OFFICIAL_DECAYED_NORMS = (".downsample.", ".projector.", ".predictors.")


def excluded_from_decay(name: str, parameter: torch.Tensor, rule: str = "ndim") -> bool:
    """Whether the parameter called ``name`` gets no weight decay (and, with LARS, no trust ratio).

    ``ndim``: every tensor with ``ndim <= 1`` (biases and norm parameters). ``official``: the released code's list,
    i.e. biases and norm weights except those in :data:`OFFICIAL_DECAYED_NORMS` (9 tensors of ResNet-50 MCL).
    """
    if rule == "ndim":
        return parameter.ndim <= 1
    if rule == "official":
        if name.endswith("bias"):
            return True
        return parameter.ndim <= 1 and not any(part in f".{name}" for part in OFFICIAL_DECAYED_NORMS)
    raise ValueError(f"no_decay_rule={rule!r} is invalid: use one of {NO_DECAY_RULES}")


def parameter_groups(
    module: nn.Module, weight_decay: float, rule: str = "ndim", exclude: Sequence[str] = ()
) -> list[dict]:
    """Two groups: weights with ``weight_decay``, and the parameters :func:`excluded_from_decay` picks, without.

    With :class:`Lars` a group whose weight decay is 0 also skips the trust-ratio adaptation, as the released code
    does for the parameters it excludes. ``exclude``: child modules whose parameters are in neither group (the online
    probe, which has an optimiser of its own).
    """
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad and name.split(".", 1)[0] not in exclude:
            (no_decay if excluded_from_decay(name, parameter, rule) else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]


class Lars(TimmLars):
    """timm's LARS, optionally with the released code's momentum rule.

    timm keeps ``buf = m * buf + u`` and steps ``p -= lr * buf``: the current lr scales the whole buffer. With
    ``lr_in_momentum=True`` the update is the released code's ``buf = m * buf + lr * u``, ``p -= buf``: each step's lr
    stays with its own contribution. The two agree at a constant lr and differ while it changes (warmup). Here the
    buffer is kept in units of the current lr (rescaled by ``lr_before / lr_now`` before each step), so timm's
    update code runs unchanged. ``u`` is the trust-ratio-scaled gradient plus weight decay in both.
    """

    def __init__(self, params, lr: float = 1.0, lr_in_momentum: bool = False, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self.defaults["lr_in_momentum"] = lr_in_momentum
        for group in self.param_groups:
            group.setdefault("lr_in_momentum", lr_in_momentum)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group["lr_in_momentum"] or group["momentum"] == 0:
                continue
            lr, buffer_lr = group["lr"], group.get("buffer_lr")
            if lr <= 0:
                raise ValueError(f"lr={lr}: LARS with lr_in_momentum needs a positive learning rate")
            buffers = [self.state[p]["momentum_buffer"] for p in group["params"] if "momentum_buffer" in self.state[p]]
            if buffers and buffer_lr != lr:
                torch._foreach_mul_(buffers, buffer_lr / lr)
            group["buffer_lr"] = lr
        return super().step(closure)


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int | None = 256) -> float:
    """Linear scaling rule ``base_lr * global_batch / reference_batch``; ``reference_batch=None`` disables it."""
    if reference_batch is None:
        return base_lr
    return base_lr * global_batch / reference_batch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Learning rate at optimiser ``step``.

    Linear warmup to ``base_lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2


def official_cosine(
    step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float, warmup_ratio: float = 1e-4
) -> float:
    """The released code's schedule (mmcv's cosine annealing with linear warmup, by iteration).

    A cosine over the whole run, ``min_lr + (base_lr - min_lr) * (1 + cos(pi * step / total_steps)) / 2``, multiplied
    during the first ``warmup_steps`` by ``warmup_ratio + (1 - warmup_ratio) * step / warmup_steps``.
    """
    progress = min(1.0, step / max(1, total_steps))
    lr = min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2
    if step < warmup_steps:
        lr *= warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
    return lr


def learning_rate(
    shape: str,
    step: int,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    min_lr: float,
    warmup_ratio: float = 1e-4,
) -> float:
    """The lr at ``step`` for a schedule ``shape``: ``official`` (:func:`official_cosine`) or
    ``warmup_then_cosine`` (:func:`warmup_cosine`)."""
    if shape == "official":
        return official_cosine(step, total_steps, warmup_steps, base_lr, min_lr, warmup_ratio)
    if shape == "warmup_then_cosine":
        return warmup_cosine(step, total_steps, warmup_steps, base_lr, min_lr)
    raise ValueError(f"scheduler.shape={shape!r} is invalid: use one of {SCHEDULE_SHAPES}")


def check_schedule(
    shape: str = "official",
    warmup_epochs: float = 10.0,
    warmup_ratio: float = 1e-4,
    min_lr_ratio: float = 6.25e-6,
    warmup_steps: int | None = None,
) -> None:
    """Fail with the offending ``scheduler.*`` key when a setting of :class:`WarmupCosineLR` is out of range."""
    if shape not in SCHEDULE_SHAPES:
        raise ValueError(f"scheduler.shape={shape!r} is invalid: use one of {SCHEDULE_SHAPES}")
    if warmup_epochs < 0:
        raise ValueError(f"scheduler.warmup_epochs={warmup_epochs} is invalid: use 0 or more epochs")
    if warmup_steps is not None and (
        isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0
    ):
        raise ValueError(
            f"scheduler.warmup_steps={warmup_steps!r} is invalid: use an integer >= 0, or null to count the warmup "
            "in epochs (scheduler.warmup_epochs)"
        )
    if not 0 < warmup_ratio <= 1:
        raise ValueError(f"scheduler.warmup_ratio={warmup_ratio} is invalid: it must be in (0, 1]")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(
            f"scheduler.min_lr_ratio={min_lr_ratio} is invalid: the floor is a fraction of the (scaled) peak lr, "
            "in [0, 1]"
        )


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """The per-step lr of pretraining: a cosine from the optimizer's lr to ``min_lr_ratio`` x that lr, with a warmup
    (``shape``: the released code's ``official`` or ``warmup_then_cosine``, see :func:`learning_rate`).

    The defaults are those of the ``scheduler`` config (``conf/scheduler/warmup_cosine.yaml``), so that a model built
    in Python schedules its lr as ``mcl-train`` does.

    The warmup lasts ``warmup_steps`` optimiser steps when given (the released recipe fixes 3,127), otherwise
    ``ceil(warmup_epochs x steps_per_epoch)``; never more than ``total_steps``. The floor is relative to the peak, so
    it follows the linear lr scaling: any batch size gives the same shape. ``total_steps`` and ``steps_per_epoch``
    come from the Trainer; the config group ``scheduler`` holds the rest (a ``_partial_`` that the method completes
    in ``configure_optimizers``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        steps_per_epoch: float,
        shape: str = "official",
        warmup_epochs: float = 10.0,
        warmup_ratio: float = 1e-4,
        min_lr_ratio: float = 6.25e-6,
        warmup_steps: int | None = None,
    ):
        check_schedule(shape, warmup_epochs, warmup_ratio, min_lr_ratio, warmup_steps)
        total_steps = max(1, total_steps)
        if warmup_steps is None:
            warmup_steps = math.ceil(warmup_epochs * steps_per_epoch)
        self.warmup_steps = min(total_steps, warmup_steps)
        self.total_steps = total_steps

        def factor(step: int) -> float:
            """The lr at ``step`` relative to the optimizer's, as LambdaLR wants it."""
            return learning_rate(shape, step, total_steps, self.warmup_steps, 1.0, min_lr_ratio, warmup_ratio)

        super().__init__(optimizer, factor)
