import logging
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mcl.optim import WarmupCosineLR
from mcl.optimization import OptimizerSetup
from mcl.resume import ConfiguredOptimizerOnResume

TRAINER = SimpleNamespace(
    datamodule=SimpleNamespace(batch_size=256),
    world_size=1,
    accumulate_grad_batches=1,
    estimated_stepping_batches=20,
    max_epochs=2,
)


def trained(lr, steps=7, momentum=0.9):
    """An optimiser and schedule built at ``lr`` and stepped ``steps`` times, as a checkpoint restores them."""
    setup = OptimizerSetup(partial(torch.optim.SGD, lr=lr, momentum=momentum), partial(WarmupCosineLR, warmup_epochs=1))
    configured = setup.configure(nn.Linear(3, 3), TRAINER)
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    for _ in range(steps):
        optimizer.step()
        schedule.step()
    return setup, schedule


def resume(setup, schedule, ckpt_path="last.ckpt"):
    trainer = SimpleNamespace(ckpt_path=ckpt_path, lr_scheduler_configs=[SimpleNamespace(scheduler=schedule)])
    ConfiguredOptimizerOnResume(setup).on_train_start(trainer, None)


def test_a_resume_applies_the_configured_lr_at_the_resumed_step(caplog):
    _, restored = trained(lr=0.5)
    config, expected = trained(lr=1.0, momentum=0.8)  # the config now: what training from scratch would give
    with caplog.at_level(logging.WARNING, logger="mcl.resume"):
        resume(config, restored)
    assert restored.last_epoch == 7 and restored.base_lrs == [1.0, 1.0]
    assert [group["lr"] for group in restored.optimizer.param_groups] == expected.get_last_lr()
    assert restored.get_last_lr() == expected.get_last_lr()
    assert all(group["momentum"] == 0.8 for group in restored.optimizer.param_groups)
    assert "applying: lr 0.5 -> 1, momentum 0.9 -> 0.8" in caplog.text
    restored.step()
    expected.step()
    assert restored.get_last_lr() == pytest.approx(expected.get_last_lr())


def test_nothing_changes_without_a_resume_or_with_the_same_settings(caplog):
    config, schedule = trained(lr=0.5)
    before = schedule.get_last_lr()
    with caplog.at_level(logging.WARNING, logger="mcl.resume"):
        resume(config, schedule, ckpt_path=None)
        resume(config, schedule)
    assert schedule.get_last_lr() == before and schedule.last_epoch == 7
    assert caplog.text == ""
