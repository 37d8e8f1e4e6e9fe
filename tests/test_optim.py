import pytest
import torch
from timm.optim import Lars
from torch import nn

from mcl.optim import parameter_groups, scaled_lr, warmup_cosine


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
    optimizer = Lars(parameter_groups(model, 1e-5), lr=0.5, momentum=0.9, trust_coeff=1e-3)
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
