"""``mcl.stepping.train_step``, the step that benchmarks and tests share: plain SGD moves every parameter by
``-lr * grad`` of the loss it returns (to float32 round-off), and the EMA then moves each target parameter to
``m * target + (1 - m) * online``."""

import copy

import torch

from mcl.stepping import train_step

from .conftest import small_mcl, small_supervised


def test_one_step_is_forward_backward_sgd_then_the_ema_update():
    model = small_mcl(levels=2)
    views = torch.randn(6, 2, 2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    before = copy.deepcopy(model)
    model.seed_montages(3)
    loss = train_step(model, optimizer, views, momentum=0.75)

    before.seed_montages(3)  # the same montages, by hand
    expected, _ = before.forward_losses(views)
    assert loss.item() == expected.item()
    expected.backward()
    for (name, new), old in zip(model.named_parameters(), before.parameters(), strict=True):
        if not new.requires_grad:
            continue
        assert torch.equal(new.grad, old.grad), name
        assert torch.allclose(new, old - 0.1 * old.grad, rtol=0, atol=1e-6), name
    moved = []
    for (online_module, target_module), (old_online_module, old_module) in zip(
        model.momentum_pairs, before.momentum_pairs, strict=True
    ):
        triples = zip(online_module.parameters(), target_module.parameters(), old_module.parameters(), strict=True)
        for online, target, old_target in triples:
            assert torch.allclose(target, 0.75 * old_target + 0.25 * online, rtol=0, atol=1e-6)
        for online, old_online in zip(online_module.parameters(), old_online_module.parameters(), strict=True):
            moved.append(not torch.equal(online, old_online))
    # every weight a gradient reaches moves (not the residual branches: zero-initialised last BatchNorm scales)
    assert sum(moved) == 58 and len(moved) == 90


def test_a_method_without_a_target_fits_a_repeated_batch():
    model = small_supervised(levels=2)
    views = torch.randn(6, 2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(6) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.seed_montages(0)
    first = train_step(model, optimizer, views, labels, momentum=0.99).item()
    for _ in range(4):
        model.seed_montages(0)
        last = train_step(model, optimizer, views, labels, momentum=0.99).item()
    assert last < 0.75 * first  # 1.71 -> 0.91 in five steps
