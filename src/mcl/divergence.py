"""Divergence guards of a training run: non-finite steps kept out of the weights and reported, and weights whose norm
grew past a bound (or stopped being finite) never saved."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch

from mcl.checkpoints import LastCheckpoint, load_checkpoint
from mcl.guards import FiniteGuard


def weight_norm(model: torch.nn.Module) -> float:
    """The L2 norm of all trainable weights (one host sync)."""
    weights = [p.detach().float() for p in model.parameters() if p.requires_grad]
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(weights))))


def saved_state_note(trainer: pl.Trainer | None) -> str:
    """Which checkpoint holds good weights: the run's ``last.ckpt`` and its step, if one was written."""
    callbacks = trainer.callbacks if trainer is not None else []
    last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
    if last is None or not last.path.is_file():
        return "No checkpoint of this run was written."
    step = load_checkpoint(last.path).get("global_step")
    return (
        f"The newest checkpoint, {last.path} (step {step}), was written before this and passed the weight check; "
        "resume from it with ckpt_path=... and the new settings (they apply on resume)."
    )


class DivergenceGuard(pl.Callback):
    """Stops a run that diverged, and never saves its state.

    - A step whose loss (:meth:`see_loss`) or gradients are non-finite has its gradients zeroed on the device before
      the optimiser step (:class:`~mcl.guards.FiniteGuard`, no host sync); under fp16 loss scaling, whose scaler
      skips such steps itself, only a non-finite loss is recorded. The record is read every ``finite_check_every``
      steps, at each epoch's end, at the end and before every checkpoint (:meth:`check_finite`).
    - The weights' norm is compared with its value at the start (kept in checkpoints as ``initial_weight_norm``) at
      each epoch's end and before every checkpoint (:meth:`check_weights`): beyond ``max_weight_norm_ratio`` times
      it (``None``: no bound), or non-finite, the run stops.

    Args:
        max_weight_norm_ratio: a number > 1, or ``None``.
        finite_check_every: steps between reads of the non-finite record.
    """

    def __init__(self, max_weight_norm_ratio: float | None = 1.0e4, finite_check_every: int = 50):
        if max_weight_norm_ratio is not None and max_weight_norm_ratio <= 1:
            raise ValueError(f"max_weight_norm_ratio={max_weight_norm_ratio} is invalid: use a number > 1 or null")
        self.max_weight_norm_ratio = max_weight_norm_ratio
        self.finite_guard = FiniteGuard(finite_check_every)
        self.initial_weight_norm: float | None = None

    def restore(self, checkpoint: dict) -> None:
        """The initial weight norm a checkpoint kept (:meth:`on_save_checkpoint`)."""
        self.initial_weight_norm = checkpoint.get("initial_weight_norm", self.initial_weight_norm)

    def see_loss(self, loss: torch.Tensor) -> None:
        self.finite_guard.see_loss(loss)

    def check_weights(self, trainer: pl.Trainer | None, model: pl.LightningModule) -> None:
        """Raise if the weights are non-finite or their norm grew past ``max_weight_norm_ratio`` x its initial value."""
        norm = weight_norm(model)
        initial, ratio = self.initial_weight_norm, self.max_weight_norm_ratio
        finite = math.isfinite(norm)
        if finite and (ratio is None or initial is None or norm <= ratio * initial):
            return
        growth = f"{norm:.3g}, {norm / initial:.3g}x its initial {initial:.3g}" if finite and initial else f"{norm}"
        raise FloatingPointError(
            f"the weights diverged at global step {model.global_step}: their norm is {growth} (limit "
            f"method.max_weight_norm_ratio={ratio}); this state was not saved. {saved_state_note(trainer)} "
            "Lower optimizer.lr or raise scheduler.warmup_epochs."
        )

    def check_finite(self, trainer: pl.Trainer | None, model: pl.LightningModule) -> None:
        """Stop if a step since the start was non-finite (its gradient was discarded); one host sync."""
        found = self.finite_guard.first_bad_step()
        if found is None:
            return
        step, what = found
        raise FloatingPointError(
            f"non-finite {what} at global step {step}: that step's gradient was discarded on the device (the weights "
            f"stayed finite) and the run stopped at step {model.global_step}, when the guard was read "
            f"(method.finite_check_every={self.finite_guard.check_every}). {saved_state_note(trainer)} Lower "
            "optimizer.lr, raise scheduler.warmup_epochs or use 32-bit precision (trainer.precision=32-true)."
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.initial_weight_norm is None:
            self.initial_weight_norm = weight_norm(pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        gradients = (p.grad for p in pl_module.parameters() if p.grad is not None)
        self.finite_guard.mask_gradients(gradients, pl_module.global_step, loss_only=scaled)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.finite_guard.due(pl_module.global_step):
            self.check_finite(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_finite(trainer, pl_module)
        self.check_weights(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_finite(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Never save weights after a non-finite step or diverged ones; keep the initial weight norm."""
        self.check_finite(trainer, pl_module)
        self.check_weights(trainer, pl_module)
        checkpoint["initial_weight_norm"] = self.initial_weight_norm
