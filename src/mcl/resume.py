"""On resume, the config's optimiser settings rather than the checkpoint's."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from mcl.optimization import OptimizerSetup

log = logging.getLogger(__name__)
# Group keys that follow from the others: the current lr is the schedule's, the buffer lr the optimiser's own.
DERIVED_KEYS = ("lr", "buffer_lr")


def apply_group_settings(
    scheduler: torch.optim.lr_scheduler.LRScheduler, configured: Sequence[dict[str, Any]]
) -> set[str]:
    """Set the settings of ``configured`` groups on the scheduler's optimiser (``initial_lr`` also as the
    scheduler's ``base_lrs``); return what changed, as ``"key old -> new"``."""
    changes: set[str] = set()
    for index, (group, wanted) in enumerate(zip(scheduler.optimizer.param_groups, configured, strict=True)):
        for key, value in wanted.items():
            if key in DERIVED_KEYS or group.get(key) == value:
                continue
            if key == "initial_lr":
                changes.add(f"lr {group[key]:g} -> {value:g}")
                scheduler.base_lrs[index] = value
            else:
                changes.add(f"{key} {group.get(key)} -> {value}")
            group[key] = value
    return changes


def recompute_lr(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Set the groups' lr (and the scheduler's last lr) to what the schedule gives at its current step from its
    ``base_lrs``: one step back, then the scheduler's own ``step``."""
    scheduler.last_epoch -= 1
    scheduler.step()


class ConfiguredOptimizerOnResume(pl.Callback):
    """On resume, apply the config's optimiser hyper-parameters and lr (those ``setup`` built the optimiser with)
    rather than the checkpoint's, which Lightning restores into the optimiser and the scheduler, and say which
    changed. The lr follows the schedule at the resumed step from the new base lr."""

    def __init__(self, setup: OptimizerSetup):
        self.setup = setup

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        configured = self.setup.configured_groups
        if not configured or trainer.ckpt_path is None:
            return
        changes: set[str] = set()
        for config in trainer.lr_scheduler_configs:
            changes |= apply_group_settings(config.scheduler, configured)
            if isinstance(config.scheduler, torch.optim.lr_scheduler.LambdaLR):
                recompute_lr(config.scheduler)
        if changes:
            log.warning(
                "resumed with other optimiser settings than the checkpoint's; applying: %s", ", ".join(sorted(changes))
            )
