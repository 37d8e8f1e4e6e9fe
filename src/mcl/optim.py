"""Optimiser parameter groups and learning-rate schedules (SPEC §6)."""

from __future__ import annotations

import math

from torch import nn


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with ``weight_decay``, and biases and norm parameters (every tensor of ndim <= 1) without.

    With ``timm.optim.Lars`` a group whose weight decay is 0 also skips the trust-ratio adaptation, which is what
    the released code does for biases and BN parameters.
    """
    decay, no_decay = [], []
    for parameter in module.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]


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
