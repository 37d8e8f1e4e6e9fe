import math
from types import SimpleNamespace

import hydra
import pytest
import torch
from hydra.errors import InstantiationException
from timm.optim import Lars as TimmLars
from torch import nn

from mcl.methods import MCL
from mcl.optim import (
    Lars,
    excluded_from_decay,
    learning_rate,
    official_cosine,
    parameter_groups,
    scaled_lr,
    warmup_cosine,
)

from .conftest import compose_train


def test_biases_and_norm_parameters_get_no_weight_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = parameter_groups(model, 1e-5)
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    assert {p.shape for p in decay["params"]} == {torch.Size([4, 3, 3, 3]), torch.Size([2, 4])}
    assert {p.shape for p in no_decay["params"]} == {torch.Size([4]), torch.Size([2])}
    assert len(no_decay["params"]) == 4  # conv bias, BN weight and bias, linear bias


def test_lars_adapts_weights_but_not_the_excluded_group():
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    weight_before, bias_before = model.weight.detach().clone(), model.bias.detach().clone()
    model.weight.grad = torch.ones(4, 4)
    model.bias.grad = torch.ones(4)
    optimizer = TimmLars(parameter_groups(model, 1e-5), lr=0.5, momentum=0.9, trust_coeff=1e-3)
    optimizer.step()
    # The bias moves by a plain SGD step; the weight by a trust-ratio scaled one.
    assert torch.allclose(model.bias.detach(), bias_before - 0.5)
    grad = torch.ones(4, 4) + 1e-5 * weight_before
    trust = 1e-3 * weight_before.norm() / (grad.norm())
    assert torch.allclose(model.weight.detach(), weight_before - 0.5 * trust * grad, atol=1e-6)


def test_warmup_then_cosine():
    values = [warmup_cosine(s, total_steps=110, warmup_steps=10, base_lr=1.0, min_lr=0.0) for s in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.5)
    assert values[110] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    assert warmup_cosine(110, 110, 10, 1.0, 1e-4) == pytest.approx(1e-4)


def test_linear_lr_scaling():
    assert scaled_lr(1.0, 4096) == 16.0
    assert scaled_lr(0.3, 64) == pytest.approx(0.075)
    assert scaled_lr(0.3, 64, None) == 0.3


@pytest.fixture(scope="module")
def resnet50_mcl():
    return MCL(backbone={"name": "resnet50"}, neck={"name": "fpn"}, image_size=224, levels=4)


def test_official_no_decay_list_keeps_decay_on_nine_norm_weights(resnet50_mcl):
    """The released regexes miss the 4 shortcut-BN weights and the projector's and 4 predictors' BatchNorm1d weights."""
    names = dict(resnet50_mcl.named_parameters())
    ndim = {n for n, p in names.items() if p.requires_grad and excluded_from_decay(n, p, "ndim")}
    official = {n for n, p in names.items() if p.requires_grad and excluded_from_decay(n, p, "official")}
    assert official < ndim
    assert sorted(ndim - official) == sorted(
        [f"backbone.model.layer{i}.0.downsample.1.weight" for i in range(1, 5)]
        + ["projector.1.weight"]
        + [f"predictors.{i}.1.weight" for i in range(4)]
    )
    assert all(n.endswith("bias") or names[n].ndim == 1 for n in official)
    decay, no_decay = parameter_groups(resnet50_mcl, 1e-5, "official")
    assert len(no_decay["params"]) == len(official) and len(decay["params"]) + len(official) == sum(
        p.requires_grad for p in names.values()
    )
    with pytest.raises(ValueError, match="no_decay_rule='regex'"):
        excluded_from_decay("x.bias", names["projector.1.weight"], "regex")


def released_lars(weight, grads, lrs, momentum=0.9, weight_decay=1e-5, trust_coeff=1e-3):
    """The released LARS, written from its formula: ``u = (g + wd w) * eta |w| / (|g| + wd |w|)``,
    ``buf = m buf + lr u``, ``w -= buf``."""
    buffer = None
    for grad, lr in zip(grads, lrs, strict=True):
        trust = trust_coeff * weight.norm() / (grad.norm() + weight_decay * weight.norm())
        step = lr * (grad + weight_decay * weight) * trust
        buffer = step if buffer is None else momentum * buffer + step
        weight = weight - buffer
    return weight


def run_lars(weight, grads, lrs, lr_in_momentum):
    parameter = nn.Parameter(weight.clone())
    optimizer = Lars([parameter], lr=lrs[0], momentum=0.9, weight_decay=1e-5, eps=0.0, lr_in_momentum=lr_in_momentum)
    for grad, lr in zip(grads, lrs, strict=True):
        optimizer.param_groups[0]["lr"] = lr
        parameter.grad = grad
        optimizer.step()
    return parameter.detach()


def test_lars_with_the_lr_in_the_momentum_buffer_follows_the_released_formula():
    torch.manual_seed(0)
    weight = torch.randn(8, 8, dtype=torch.float64)
    grads = [torch.randn(8, 8, dtype=torch.float64) for _ in range(6)]
    warmup = [0.1, 0.5, 1.0, 2.0, 4.0, 8.0]
    expected = released_lars(weight, grads, warmup)
    assert torch.allclose(run_lars(weight, grads, warmup, lr_in_momentum=True), expected, rtol=1e-10, atol=1e-12)
    # timm's rule applies each step's lr to the whole buffer: different while the lr changes ...
    assert not torch.allclose(run_lars(weight, grads, warmup, lr_in_momentum=False), expected, rtol=1e-3)
    # ... and the same at a constant lr.
    constant = [2.0] * 6
    timm_rule = run_lars(weight, grads, constant, lr_in_momentum=False)
    assert torch.allclose(timm_rule, released_lars(weight, grads, constant), rtol=1e-10, atol=1e-12)


def test_official_schedule_values():
    """A cosine over the whole run from step 0, times a warmup factor rising linearly from warmup_ratio to 1."""
    base, low, ratio, total, warmup = 16.0, 1e-4, 1e-4, 1000, 100

    def cosine(step):
        return low + (base - low) * (1 + math.cos(math.pi * step / total)) / 2

    assert official_cosine(0, total, warmup, base, low, ratio) == pytest.approx(base * ratio)
    assert official_cosine(50, total, warmup, base, low, ratio) == pytest.approx(cosine(50) * (ratio + (1 - ratio) / 2))
    assert official_cosine(99, total, warmup, base, low, ratio) == pytest.approx(
        cosine(99) * (ratio + 0.99 * (1 - ratio))
    )
    assert official_cosine(100, total, warmup, base, low, ratio) == pytest.approx(cosine(100))
    assert official_cosine(500, total, warmup, base, low, ratio) == pytest.approx((base + low) / 2)
    assert official_cosine(1000, total, warmup, base, low, ratio) == pytest.approx(low)
    # The library's other shape reaches the base lr at the end of warmup and starts its cosine there.
    assert learning_rate("warmup_then_cosine", 99, total, warmup, base, low) == pytest.approx(base)
    assert learning_rate("warmup_then_cosine", 550, total, warmup, base, low) == pytest.approx((base + low) / 2)
    with pytest.raises(ValueError, match="scheduler.shape='step'"):
        learning_rate("step", 0, total, warmup, base, low)


def released_lr(step: int, max_iters: int, base_lr: float = 16.0, min_lr: float = 1e-4) -> float:
    """The released config's lr at iteration ``step``: its ``CosineAnnealingIntervalLrUpdaterHook`` (``annealing_cos``
    from ``base_lr`` to ``min_lr`` over ``max_iters``) under mmcv's linear warmup of ``warmup_iters=3127`` with
    ``warmup_ratio=1e-4`` (``k = (1 - step / warmup_iters) * (1 - warmup_ratio)``, ``lr = regular * (1 - k)``)."""
    regular = min_lr + 0.5 * (base_lr - min_lr) * (math.cos(math.pi * step / max_iters) + 1)
    warmup_iters, warmup_ratio = 3127, 1e-4
    if step >= warmup_iters:
        return regular
    k = (1 - step / warmup_iters) * (1 - warmup_ratio)
    return regular * (1 - k)


def test_official_preset_builds_the_released_optimizer_and_schedule():
    """The released recipe at batch 4096 (128 x 32 GPUs), 100 epochs of 312 steps: LARS at lr 16 with the lr in the
    momentum buffer, and the released schedule (down to 1e-4, 3127 warmup iterations: scheduler.warmup_steps) at
    its first step, the last and first steps after the warmup, mid-run and the last step."""
    cfg = compose_train(["experiment=mcl_official_r50_b4096_e100_imagenet", "method.projector_hidden_dim=64"])
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    total = 312 * 100
    model._trainer = SimpleNamespace(
        estimated_stepping_batches=total,
        max_epochs=100,
        datamodule=SimpleNamespace(batch_size=128),
        world_size=32,
        accumulate_grad_batches=1,
    )
    configured = model.configure_optimizers()
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, Lars) and optimizer.defaults["lr_in_momentum"] is True
    assert optimizer.defaults["lr"] == 16.0
    assert schedule.warmup_steps == 3127  # not 10 epochs x 312 = 3120
    for step in (0, 3126, 3127, total // 2, total - 1):
        assert 16.0 * schedule.lr_lambdas[0](step) == pytest.approx(released_lr(step, total), rel=1e-12)
    assert 16.0 * schedule.lr_lambdas[0](0) == pytest.approx(16.0 * 1e-4)
    assert released_lr(3126, total) < released_lr(3127, total)  # the last warmup step is still below the cosine


def configured_schedule(overrides: list[str], batch: int, devices: int = 1, total: int = 1000):
    """The optimizer and schedule that ``configure_optimizers`` builds for a composed config and batch."""
    cfg = compose_train([*overrides, "method.projector_hidden_dim=64"])
    assert cfg.scheduler._partial_ and cfg.scheduler._target_ == "mcl.optim.WarmupCosineLR"
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    model._trainer = SimpleNamespace(
        estimated_stepping_batches=total, max_epochs=10, datamodule=SimpleNamespace(batch_size=batch),
        world_size=devices, accumulate_grad_batches=1,
    )  # fmt: skip
    configured = model.configure_optimizers()
    return configured["optimizer"], configured["lr_scheduler"]["scheduler"]


def test_the_lr_floor_follows_the_scaled_peak_at_any_batch_size():
    """AdamW (lr 1e-3 at batch 256) at batch 4: peak 1.5625e-5, and the cosine ends at min_lr_ratio x that peak."""
    for batch in (4, 256, 4096):
        optimizer, schedule = configured_schedule(["optimizer=adamw", "scheduler.min_lr_ratio=0.01"], batch)
        peak = 1e-3 * batch / 256
        assert optimizer.defaults["lr"] == pytest.approx(peak)
        # the default recipe's half-epoch warmup of a 10-epoch, 1,000-step run
        assert schedule.warmup_steps == 50 and schedule.lr_lambdas[0](1000) == pytest.approx(0.01)
    shape = ["scheduler.shape=warmup_then_cosine", "scheduler.warmup_epochs=1", "scheduler.min_lr_ratio=0.01"]
    _, schedule = configured_schedule(shape, 4)
    assert schedule.warmup_steps == 100
    assert schedule.lr_lambdas[0](99) == pytest.approx(1.0) and schedule.lr_lambdas[0](1000) == pytest.approx(0.01)


def test_warmup_steps_override_the_warmup_epochs():
    """``scheduler.warmup_steps`` null: ``ceil(warmup_epochs x steps per epoch)`` (1 epoch of a 1,000-step, 10-epoch
    run: 100); an integer is the warmup itself, whatever the epochs say, and never longer than the run."""
    shape = ["scheduler.shape=official", "scheduler.warmup_epochs=1", "scheduler.min_lr_ratio=0.01"]
    assert configured_schedule(shape, 4)[1].warmup_steps == 100
    _, schedule = configured_schedule([*shape, "scheduler.warmup_steps=37"], 4)
    assert schedule.warmup_steps == 37
    factor = 1e-4 + (1 - 1e-4) * 36 / 37  # the last warmup step
    assert schedule.lr_lambdas[0](36) == pytest.approx(official_cosine(36, 1000, 0, 1.0, 0.01) * factor)
    assert schedule.lr_lambdas[0](37) == pytest.approx(official_cosine(37, 1000, 0, 1.0, 0.01))
    assert configured_schedule([*shape, "scheduler.warmup_steps=0"], 4)[1].lr_lambdas[0](0) == pytest.approx(1.0)
    assert configured_schedule([*shape, "scheduler.warmup_steps=5000"], 4)[1].warmup_steps == 1000


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("scheduler.warmup_steps=-1", r"scheduler.warmup_steps=-1 is invalid: use an integer >= 0, or null"),
        ("scheduler.warmup_steps=2.5", r"scheduler.warmup_steps=2.5 is invalid"),
        ("scheduler.min_lr_ratio=1.5", r"scheduler.min_lr_ratio=1.5 is invalid: the floor is a fraction"),
        ("scheduler.warmup_ratio=0", r"scheduler.warmup_ratio=0 is invalid: it must be in \(0, 1\]"),
        ("scheduler.shape=step", r"scheduler.shape='step' is invalid"),
        ("scheduler.warmup_epochs=-1", r"scheduler.warmup_epochs=-1 is invalid"),
    ],
)
def test_bad_schedule_settings_fail_when_the_method_is_built(override, message):
    cfg = compose_train([override, "method.projector_hidden_dim=64"])
    with pytest.raises(InstantiationException, match=message):  # Hydra's wrapper of the method's ValueError
        hydra.utils.instantiate(cfg.method, _convert_="all")
