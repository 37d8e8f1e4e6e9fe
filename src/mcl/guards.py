"""Non-finite steps caught on the device, read on the host only now and then.

Checking every step's loss or gradients on the host (``if not torch.isfinite(loss)``) makes the host wait for the
device at every step. :class:`FiniteGuard` keeps the same guarantees without that wait:

- **no non-finite step reaches the parameters**: before each optimiser step it computes, on the device, whether the
  loss and every gradient are finite, and where they are not it zeroes the gradients (``masked_fill``, no branch on
  the host), so that step changes the weights only by what a zero gradient does (momentum, weight decay): they stay
  finite (BatchNorm running statistics are updated in the forward pass and may have taken in the non-finite
  values: they are buffers, checked with the weights before any checkpoint is written);
- **the run stops, and no checkpoint is written after it**: the first non-finite step and what was non-finite are
  recorded on the device; :meth:`check` reads that record on the host (one sync) every ``check_every`` steps, before
  every checkpoint is written and at the end of each epoch and of training, and raises naming the step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

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
        self.last_read: int | None = None

    def see_loss(self, loss: torch.Tensor) -> None:
        """Remember whether this step's loss is finite (on the device) for :meth:`mask_gradients`."""
        finite = torch.isfinite(loss.detach())
        self.loss_finite = finite if self.loss_finite is None else self.loss_finite & finite  # accumulated batches

    def mask_gradients(self, gradients: Iterable[torch.Tensor], step: int, loss_only: bool = False) -> None:
        """Zero every gradient when the loss or any gradient is non-finite, and record the first such step.

        ``loss_only`` (fp16 loss scaling, whose scaler skips steps with non-finite gradients itself and meets them
        as a matter of course while it tunes its scale): record a non-finite loss, leave the gradients to the
        scaler. Under several ranks the decision is taken for all of them at once (a rank whose own loss is
        non-finite zeroes everyone's step: one small all_reduce, no host sync), so the ranks' weights never part."""
        gradients = list(gradients)
        if not gradients:
            return
        device = gradients[0].device
        if self.record is None or self.record.device != device:
            self.record = torch.full((2,), -1, dtype=torch.long, device=device)
        loss_finite = self.loss_finite
        if loss_finite is None:
            loss_finite = torch.ones((), dtype=torch.bool, device=device)
        if loss_only:
            gradients_finite = torch.ones((), dtype=torch.bool, device=device)
        else:
            gradients_finite = torch.isfinite(torch.stack(torch._foreach_norm(gradients))).all()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flags = torch.stack([~loss_finite, ~gradients_finite]).to(torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            loss_finite, gradients_finite = flags[0] == 0, flags[1] == 0
        bad = ~(gradients_finite & loss_finite)
        if not loss_only:
            for gradient in gradients:
                gradient.masked_fill_(bad, 0)
        what = torch.where(loss_finite, GRADIENTS, LOSS)
        first = bad & (self.record[0] < 0)
        self.record.copy_(torch.where(first, torch.stack([torch.full_like(what, step), what]), self.record))
        self.loss_finite = None

    def due(self, step: int) -> bool:
        """Whether the record is to be read at ``step``: every ``check_every`` steps, once per step (with gradient
        accumulation the step count stays the same over several batches)."""
        if step % self.check_every or step == self.last_read:
            return False
        self.last_read = step
        return True

    def first_bad_step(self) -> tuple[int, str] | None:
        """``(step, what was non-finite)`` of the first non-finite step, or ``None``; one host sync."""
        if self.record is None:
            return None
        step, what = self.record.tolist()
        return (step, WHAT[what]) if step >= 0 else None

    def reset(self) -> None:
        self.record = None
        self.loss_finite = None
