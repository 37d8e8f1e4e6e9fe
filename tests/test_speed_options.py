"""The speed options ``channels_last`` and ``compile``: the default model's losses, gradients and optimiser step
within float32 round-off, the same state-dict keys, checkpoints that load either way, and compilation only when
training starts."""

import copy
import pickle
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from mcl.checkpoints import load_checkpoint
from mcl.methods import MCL, SupervisedMultiLevel
from mcl.stepping import train_step
from mcl.train import train

from .conftest import small_mcl, small_supervised

# The options change the order of float32 sums (convolution algorithms for the channels-last layout; kernels fused
# and reductions reordered by inductor), never the computation. Measured here: losses agree to 1e-7 relative (the
# next step's to 8e-7), the whole gradient vector to 2e-5 relative (BatchNorm over a few tiles amplifies the
# round-off), parameters and BatchNorm statistics after the step to 5e-7. The tolerances leave 10x room or more; a
# real difference (a missed EMA update, a wrong layout) is of order 1.
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
    loss = train_step(model, optimizer, *inputs, momentum=0.5)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
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


# ------------------------------------------------------------------------------------------------ compile
def test_compile_waits_for_fit_and_leaves_the_state_dict_alone():
    """Nothing is compiled when the model is built (export, probes and FLOP counts build models too) or for a
    validation alone; ``setup("fit")`` compiles each module of ``compiled_modules`` in place, once."""
    model = small_supervised(levels=2, compile=True)
    keys = list(model.state_dict())
    model.setup("validate")
    assert all(module._compiled_call_impl is None for module in model.modules())
    model.setup("fit")
    compiled = [module for module in model.modules() if module._compiled_call_impl is not None]
    assert compiled == [model.backbone, model.head]
    call = model.backbone._compiled_call_impl
    model.setup("fit")
    assert model.backbone._compiled_call_impl is call
    assert list(model.state_dict()) == keys and not any("_orig_mod" in key for key in keys)


def test_mcl_compiles_both_networks_after_the_target_is_made():
    model = small_mcl(levels=2, compile=True)
    model.compile_networks()
    compiled = {name for name, module in model.named_modules() if module._compiled_call_impl is not None}
    assert compiled == {
        "backbone",
        "head",
        "projector",
        "predictors.0",
        "predictors.1",
        "target_backbone",
        "target_head",
        "target_projector",
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compile_mode": "fast"}, "compile_mode='fast' is invalid"),
        ({"compile_backend": "tensorrt-ish"}, "compile_backend='tensorrt-ish' is invalid"),
        ({"compile_mode": "max-autotune", "compile_backend": "eager"}, "compile_mode='max-autotune' needs"),
    ],
)
def test_bad_compile_settings_are_rejected_with_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_mcl(**kwargs)


@pytest.fixture
def fresh_dynamo():
    """Compiled code is cached per function (``Backbone.forward``, ...) across models: start and end empty."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_mcl_trains_as_the_default():
    """inductor on the CPU (gcc) with a small trunk (timm's test_resnet, 2 levels, batch 8): same losses,
    gradients, step, BatchNorm statistics and EMA target. On the 2-core machine this takes about 2 minutes while
    inductor's cache is empty (gcc builds a C++ kernel per fused operation: forward and backward of the online
    modules, forward of the target's) and 7 to 11 s once the cache holds them."""
    small = {"levels": 2, "backbone": {"name": "test_resnet"}}
    views = torch.randn(8, 2, 2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    default = small_mcl(**small)
    compiled = small_mcl(**small, compile=True)
    compiled.compile_networks()
    initial_target = [p.clone() for _, target in compiled.momentum_pairs for p in target.parameters()]
    reference, result = step_results(default, views), step_results(compiled, views)
    assert_same_training(result, reference)
    assert list(compiled.state_dict()) == list(default.state_dict())
    # The EMA (momentum 0.5) reached the compiled target's real parameters, and its next pass read them.
    online = [p for module, _ in compiled.momentum_pairs for p in module.parameters()]
    target = [p for _, module in compiled.momentum_pairs for p in module.parameters()]
    for now, before, source in zip(target, initial_target, online, strict=True):
        assert torch.allclose(now, (before + source) / 2, atol=1e-6)


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_compiled_model_deep_copies_and_pickles_as_its_eager_self():
    """Lightning may deepcopy or pickle the module; nn.Module drops the compiled call from its state, so a copy
    is the eager model with the same weights (the tracing-only ``eager`` backend keeps this test fast)."""
    model = small_mcl(levels=2, backbone={"name": "test_resnet"}, compile=True, compile_backend="eager")
    model.compile_networks()
    views = torch.randn(8, 2, 2, 3, 64, 64)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(module._compiled_call_impl is None for module in twin.modules())
        assert list(twin.state_dict()) == list(model.state_dict())
        with torch.no_grad():
            model.seed_montages(0)
            twin.seed_montages(0)
            assert twin.eval().forward_losses(views)[0] == pytest.approx(model.eval().forward_losses(views)[0].item())
        twin.compile_networks()  # a copy compiles afresh
        assert all(module._compiled_call_impl is not None for module in twin.compiled_modules())


# ------------------------------------------------------------------------------------------ through mcl-train
@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("method", ["mcl", "supervised"])
def test_a_run_with_both_options_checkpoints_what_a_default_model_loads(tiny_cfg, method):
    """Through Hydra and Lightning: the validation at init runs eager, ``setup("fit")`` compiles, the run trains
    and validates (the eval-mode backbone compiles again) and its checkpoint, with the eager names, loads into a
    model without the options. The tracing-only ``eager`` backend keeps it short; inductor's numbers are checked
    above."""
    options = ["method.channels_last=true", "method.compile=true", "method.compile_backend=eager"]
    extra = ["method=supervised", "method.num_classes=4"] if method == "supervised" else []
    cfg = tiny_cfg(*extra, *options)
    graphs = counters["stats"]["unique_graphs"]
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert counters["stats"]["unique_graphs"] > graphs  # the networks did run compiled
    checkpoint = load_checkpoint(Path(cfg.output_dir) / "checkpoints" / "last.ckpt")
    assert checkpoint["hyper_parameters"]["compile"] and checkpoint["hyper_parameters"]["channels_last"]
    assert not any("_orig_mod" in key for key in checkpoint["state_dict"])
    model_class = SupervisedMultiLevel if method == "supervised" else MCL
    default = model_class.load_from_checkpoint(
        Path(cfg.output_dir) / "checkpoints" / "last.ckpt", channels_last=False, compile=False
    )
    assert all(p.is_contiguous() for p in default.parameters())
    assert all(module._compiled_call_impl is None for module in default.modules())
