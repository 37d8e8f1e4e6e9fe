"""One training step without a Trainer: the step ``mcl-train`` runs, for benchmarks, tests and notebooks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mcl.methods.base import MultiLevelModule


def train_step(
    model: MultiLevelModule,
    optimizer: torch.optim.Optimizer,
    *inputs: torch.Tensor,
    momentum: float,
    amp: bool = False,
) -> torch.Tensor:
    """:meth:`~mcl.methods.base.MultiLevelModule.forward_losses` on ``inputs`` (what ``training_step`` takes from
    its batch), backward, ``optimizer.step()``, then ``update_target(momentum)`` (what ``optimizer_step`` does after
    the step in training). ``amp``: the forward pass under bf16 autocast. Returns the loss; the gradients stay in the
    parameters' ``.grad``."""
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=amp):
        loss, _ = model.forward_losses(*inputs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.update_target(momentum)
    return loss
