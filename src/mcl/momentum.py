"""The momentum (EMA) target network: schedule and update."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float = 0.99, final: float = 1.0) -> float:
    """``m = final - (final - base) * (cos(pi * step / total_steps) + 1) / 2``.

    ``base`` at step 0, rising to ``final`` at ``total_steps``.
    """
    if total_steps <= 0:
        return final
    progress = min(step, total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(pairs: Iterable[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online`` for the parameters of each ``(online, target)`` pair."""
    online_params: list[torch.Tensor] = []
    target_params: list[torch.Tensor] = []
    for online, target in pairs:
        online_params.extend(p.detach() for p in online.parameters())
        target_params.extend(target.parameters())
    if len(online_params) != len(target_params):
        raise RuntimeError("online and target networks have different parameter counts")
    torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)


def make_target(online: nn.Module) -> nn.Module:
    """A frozen deep copy of ``online`` to be updated by :func:`ema_update`."""
    target = copy.deepcopy(online)
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    return target
