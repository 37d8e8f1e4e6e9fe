"""Non-finite steps caught on the device, read on the host only now and then.

Checking every step's loss or gradients on the host (``if not torch.isfinite(loss)``) makes the host wait for the
device at every step. :class:`FiniteGuard` keeps the same guarantees without that wait:

- **no non-finite step reaches the weights**: before each optimiser step it computes, on the device, whether the
  loss and every gradient are finite, and where they are not it zeroes the gradients (``masked_fill``, no branch on
  the host), so that step changes the weights only by what a zero gradient does (momentum, weight decay): they stay
  finite;
- **the run stops, and no checkpoint is written after it**: the first non-finite step and what was non-finite are
  recorded on the device; :meth:`check` reads that record on the host (one sync) every ``check_every`` steps, before
  every checkpoint is written and at the end of each epoch and of training, and raises naming the step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

LOSS, GRADIENTS = 1, 2
WHAT = {LOSS: "training loss", GRADIENTS: "gradients"}


class FiniteGuard:
    """Device-side record of the first non-finite step; see the module docstring.

    Args:
        check_every: read the record on the host every this many optimiser steps (``1``: every step, as a plain
            host check would; the stop then comes at the step itself).
    """

    def __init__(self, check_every: int = 50):
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"finite_check_every={check_every!r} is invalid: use a number of steps >= 1")
        self.check_every = check_every
        self.loss_finite: torch.Tensor | None = None
        # (first non-finite step, what: LOSS or GRADIENTS); step -1 while every step was finite.
        self.record: torch.Tensor | None = None

    def see_loss(self, loss: torch.Tensor) -> None:
        """Remember whether this step's loss is finite (on the device) for :meth:`mask_gradients`."""
        finite = torch.isfinite(loss.detach())
        self.loss_finite = finite if self.loss_finite is None else self.loss_finite & finite  # accumulated batches

    def mask_gradients(self, gradients: Iterable[torch.Tensor], step: int) -> None:
        """Zero every gradient when the loss or any gradient is non-finite, and record the first such step."""
        gradients = list(gradients)
        if not gradients:
            return
        device = gradients[0].device
        if self.record is None or self.record.device != device:
            self.record = torch.full((2,), -1, dtype=torch.long, device=device)
        norms = torch.stack(torch._foreach_norm(gradients))
        gradients_finite = torch.isfinite(norms).all()
        loss_finite = self.loss_finite
        if loss_finite is None:
            loss_finite = torch.ones((), dtype=torch.bool, device=device)
        bad = ~(gradients_finite & loss_finite)
        for gradient in gradients:
            gradient.masked_fill_(bad, 0)
        what = torch.where(loss_finite, GRADIENTS, LOSS)
        first = bad & (self.record[0] < 0)
        self.record.copy_(torch.where(first, torch.stack([torch.full_like(what, step), what]), self.record))
        self.loss_finite = None

    def due(self, step: int) -> bool:
        return step % self.check_every == 0

    def first_bad_step(self) -> tuple[int, str] | None:
        """``(step, what was non-finite)`` of the first non-finite step, or ``None``; one host sync."""
        if self.record is None:
            return None
        step, what = self.record.tolist()
        return (step, WHAT[what]) if step >= 0 else None

    def reset(self) -> None:
        self.record = None
        self.loss_finite = None
