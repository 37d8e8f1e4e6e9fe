"""The speed option ``channels_last``: the default model's losses, gradients and optimiser step within float32
round-off, the same state-dict keys, and checkpoints that load either way."""

import pytest
import torch

from mcl.momentum import ema_update

from .test_methods_mcl import small_mcl
from .test_methods_supervised import small_supervised

# The option changes the order of float32 sums (convolution algorithms for the channels-last layout), never the
# computation. Measured here: losses agree to 1e-7 relative (the next step's to 8e-7), the whole gradient vector to
# 2e-5 relative (BatchNorm over a few tiles amplifies the round-off), parameters and BatchNorm statistics after the
# step to 5e-7. The tolerances leave 10x room or more; a real difference (a wrong layout) is of order 1.
LOSS_RTOL = 1e-5
GRAD_RTOL = 3e-4
PARAM_RTOL = 1e-5


def step_results(model, views, labels=None):
    """Train mode, from the same montages: the loss, every gradient, then after one SGD step (and, for MCL, an EMA
    update at momentum 0.5, so that the target moves visibly) the parameters, the BatchNorm buffers and the next
    batch's loss."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    inputs = (views,) if labels is None else (views, labels)
    model.seed_montages(0)
    loss, _ = model.forward_losses(*inputs)
    optimizer.zero_grad()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    optimizer.step()
    if hasattr(model, "momentum_pairs"):
        ema_update(model.momentum_pairs, 0.5)
    model.seed_montages(1)
    next_loss, _ = model.forward_losses(*inputs)
    return {
        "loss": loss.item(),
        "grads": grads,
        "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
        "buffers": torch.cat([b.detach().float().flatten() for b in model.buffers()]),
        "next_loss": next_loss.item(),
    }


def relative_error(value, reference):
    return ((value - reference).norm() / reference.norm()).item()


def assert_same_training(option, reference):
    assert option["loss"] == pytest.approx(reference["loss"], rel=LOSS_RTOL)
    assert relative_error(option["grads"], reference["grads"]) < GRAD_RTOL
    assert relative_error(option["params"], reference["params"]) < PARAM_RTOL
    assert relative_error(option["buffers"], reference["buffers"]) < PARAM_RTOL
    assert option["next_loss"] == pytest.approx(reference["next_loss"], rel=LOSS_RTOL)


def conv_weights(model):
    return {name: p for name, p in model.named_parameters() if p.ndim == 4}


def input_layouts(model):
    """Records, at every backbone call (online and target), whether the images reach timm's model channels-last."""
    seen = []

    def record(module, args):
        seen.append(args[0].is_contiguous(memory_format=torch.channels_last))

    backbones = [model.backbone] + ([model.target_backbone] if hasattr(model, "target_backbone") else [])
    for backbone in backbones:
        backbone.model.register_forward_pre_hook(record)
    return seen


# ------------------------------------------------------------------------------------------- channels_last
@pytest.mark.parametrize("bn_groups", ["per_side", "joint"])
def test_channels_last_mcl_trains_as_the_default(bn_groups):
    views = torch.randn(16, 2, 3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    default = small_mcl(levels=3, bn_groups=bn_groups)
    fast = small_mcl(levels=3, bn_groups=bn_groups, channels_last=True)
    weights = conv_weights(fast)
    assert any(name.startswith("target_backbone.") for name in weights)  # the target's copies are converted too
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights.values())
    layouts = input_layouts(fast)
    assert_same_training(step_results(fast, views), step_results(default, views))
    assert layouts and all(layouts)  # plain views and montages, online and target


@pytest.mark.parametrize("classifier_input", ["tiles", "pooled_c5"])
def test_channels_last_supervised_trains_as_the_default(classifier_input):
    levels = 3 if classifier_input == "tiles" else 1
    views = torch.randn(16, levels, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(16) % 10
    default = small_supervised(levels, classifier_input=classifier_input)
    fast = small_supervised(levels, classifier_input=classifier_input, channels_last=True)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights(fast).values())
    layouts = input_layouts(fast)
    assert_same_training(step_results(fast, views, labels), step_results(default, views, labels))
    assert layouts and all(layouts)


def test_channels_last_weights_load_into_a_default_model(tmp_path):
    """Same keys; a checkpoint's channels-last tensors load into the default layout and give the same outputs."""
    fast = small_mcl(levels=2, channels_last=True).eval()
    default = small_mcl(levels=2, seed=1).eval()
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.01 * torch.randn_like(p))  # weights the default model does not already have
    assert list(default.state_dict()) == list(fast.state_dict())
    torch.save(fast.state_dict(), tmp_path / "weights.pt")
    default.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    assert all(p.is_contiguous() for p in default.parameters())
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(default.pooled_features(images), fast.pooled_features(images), rtol=1e-5, atol=1e-6)
