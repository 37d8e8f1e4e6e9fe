import math

import pytest
import torch
from torch import nn

from mcl.divergence import DivergenceGuard, weight_norm


class Model(nn.Linear):
    global_step = 3


def test_the_weight_norm_bound_stops_the_run_and_is_kept_in_checkpoints():
    model = Model(2, 2, bias=False)
    guard = DivergenceGuard(max_weight_norm_ratio=10.0)
    guard.on_fit_start(None, model)
    assert guard.initial_weight_norm == pytest.approx(model.weight.detach().norm().item())
    checkpoint = {}
    guard.on_save_checkpoint(None, model, checkpoint)
    assert checkpoint["initial_weight_norm"] == guard.initial_weight_norm
    with torch.no_grad():
        model.weight.mul_(11)
    with pytest.raises(FloatingPointError, match=r"diverged at global step 3: .*11x its initial .*ratio=10.0\)"):
        guard.on_save_checkpoint(None, model, {})
    restored = DivergenceGuard()
    restored.restore(checkpoint)
    assert restored.initial_weight_norm == checkpoint["initial_weight_norm"]
    with torch.no_grad():
        model.weight.fill_(math.inf)
    with pytest.raises(FloatingPointError, match="their norm is inf"):
        DivergenceGuard(None).check_weights(None, model)


def test_a_non_finite_loss_zeroes_the_step_and_stops_when_read():
    model = Model(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    guard = DivergenceGuard(finite_check_every=1)
    guard.see_loss(torch.tensor(float("nan")))
    trainer = type("Trainer", (), {"precision_plugin": None, "callbacks": []})()
    guard.on_before_optimizer_step(trainer, model, None)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    with pytest.raises(
        FloatingPointError, match="non-finite training loss at global step 3: .*No checkpoint of this run"
    ):
        guard.on_train_batch_end(trainer, model, None, None, 0)


def test_the_ratio_is_checked_by_name():
    with pytest.raises(ValueError, match="max_weight_norm_ratio=1 is invalid"):
        DivergenceGuard(1)


def test_the_weight_norm_counts_trainable_weights_only():
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].weight.fill_(4.0)
    assert weight_norm(model) == pytest.approx(5.0)
    model[1].requires_grad_(False)
    assert weight_norm(model) == pytest.approx(3.0)
