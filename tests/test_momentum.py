import math

import pytest
import torch
from torch import nn

from mcl.momentum import cosine_momentum, ema_update, make_target


def test_cosine_momentum_schedule_values():
    assert cosine_momentum(0, 100) == pytest.approx(0.99)
    assert cosine_momentum(50, 100) == pytest.approx(0.995)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    assert cosine_momentum(25, 100) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_momentum(10, 100, base=0.9, final=0.99) == pytest.approx(
        0.99 - 0.09 * (math.cos(0.1 * math.pi) + 1) / 2
    )


def test_ema_update_formula():
    online = nn.Linear(3, 2)
    target = make_target(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    before = [p.clone() for p in target.parameters()]
    ema_update([(online, target)], momentum=0.9)
    for old, new, source in zip(before, target.parameters(), online.parameters(), strict=True):
        assert torch.allclose(new, 0.9 * old + 0.1 * source)


def test_momentum_one_freezes_the_target():
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in target.parameters()]
    ema_update([(online, target)], momentum=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters(), strict=True))
