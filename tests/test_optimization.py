from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mcl.optim import WarmupCosineLR
from mcl.optimization import OptimizerSetup, forward_batch_size, global_batch_size

from .conftest import small_mcl


def trainer(batch_size=16, world_size=2, accumulate=1, steps=40, epochs=4):
    return SimpleNamespace(
        datamodule=SimpleNamespace(batch_size=batch_size),
        world_size=world_size,
        accumulate_grad_batches=accumulate,
        estimated_stepping_batches=steps,
        max_epochs=epochs,
    )


def model():
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))


def test_the_lr_follows_the_global_batch_and_the_schedule_steps_per_optimiser_step():
    setup = OptimizerSetup(
        partial(torch.optim.SGD, lr=0.4, weight_decay=1e-4), partial(WarmupCosineLR, warmup_epochs=1)
    )
    configured = setup.configure(model(), trainer(batch_size=16, world_size=2, accumulate=2))
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert configured["lr_scheduler"]["interval"] == "step"
    assert [group["initial_lr"] for group in optimizer.param_groups] == [pytest.approx(0.4 * 64 / 256)] * 2
    assert [group["weight_decay"] for group in optimizer.param_groups] == [1e-4, 0.0]  # ndim rule: 1-d tensors
    assert schedule.total_steps == 40 and schedule.warmup_steps == 10  # one epoch of 40 / 4 steps
    assert setup.configured_groups == [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def test_global_batch_multiplies_devices_and_accumulation():
    assert global_batch_size(trainer(batch_size=8, world_size=4, accumulate=3)) == 96
    with pytest.raises(RuntimeError, match="batch_size to scale the learning rate"):
        global_batch_size(SimpleNamespace(datamodule=None, world_size=1, accumulate_grad_batches=1))


def test_the_forward_batch_counts_devices_but_not_accumulation():
    assert forward_batch_size(trainer(batch_size=8, world_size=4, accumulate=3)) == 32
    assert forward_batch_size(SimpleNamespace(datamodule=None, world_size=2)) is None
    assert forward_batch_size(SimpleNamespace(datamodule=SimpleNamespace(), world_size=2)) is None


def test_mcl_refuses_a_global_batch_of_one_image_before_fitting():
    model = small_mcl()
    model.trainer = trainer(batch_size=1, world_size=1)
    with pytest.raises(ValueError, match=r"batch_size=1 on 1 device\(s\) gives one target per step"):
        model.setup("fit")
    model.trainer = trainer(batch_size=1, world_size=2)  # one image on each of two devices: two targets
    model.setup("fit")


def test_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="no_decay_rule='all' is invalid"):
        OptimizerSetup(partial(torch.optim.SGD, lr=0.1), no_decay_rule="all")
    with pytest.raises(ValueError, match="scheduler.warmup_epochs=-1 is invalid"):
        OptimizerSetup(partial(torch.optim.SGD, lr=0.1), partial(WarmupCosineLR, warmup_epochs=-1))
    with pytest.raises(ValueError, match="optimizer is not set"):
        OptimizerSetup(None).configure(model(), trainer())
    with pytest.raises(ValueError, match="optimizer.lr is not set"):
        OptimizerSetup(partial(torch.optim.SGD)).configure(model(), trainer())
