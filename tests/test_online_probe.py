"""The online linear probe (method.online_probe): it reads the training step's own level-0 features and changes
nothing of the model (gradients, BatchNorm statistics, optimiser, state-dict keys when off); it learns, logs its
metrics, resumes from checkpoints, and refuses unlabelled data."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mcl.backbones import pool
from mcl.methods import MCL, SupervisedMultiLevel
from mcl.online_probe import (
    OPTIMIZER_STATE,
    LevelZeroFeatures,
    OnlineProbeCallback,
    attach_probe,
    level_zero_features,
)
from mcl.train import train

from .conftest import compose_train, save_checkpoint, small_mcl, small_supervised

PROBE_KEYS = {"online_probe.classifier.weight", "online_probe.classifier.bias"}
CLASSES = 4
MCL_CASES = {
    "per_side": {},
    "per_side_plain_target": {"bn_groups": "per_side_plain_target"},
    "joint": {"bn_groups": "joint"},
    "all_pyramid_maps": {"all_pyramid_maps": True},
}
SUPERVISED_CASES = {
    "tiles": {"levels": 2},
    "all_pyramid_maps": {"levels": 2, "all_pyramid_maps": True},
    "pooled_c5": {"levels": 1, "classifier_input": "pooled_c5"},
}


def build(method: str, case: str, probe: bool):
    if method == "mcl":
        model = small_mcl(levels=2, online_probe=probe, **MCL_CASES[case])
    else:
        model = small_supervised(online_probe=probe, **SUPERVISED_CASES[case])
    if probe:
        attach_probe(model, model.probe_settings, CLASSES)
    return model


def batch(model, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = (size, 2, model.levels) if isinstance(model, MCL) else (size, model.levels)
    views = torch.randn(*shape, 3, 64, 64, generator=generator)
    return views, torch.randint(0, CLASSES, (size,), generator=generator)


def losses(model, views, labels, level_zero=None):
    if isinstance(model, SupervisedMultiLevel):
        return model.forward_losses(views, labels, level_zero)
    return model.forward_losses(views, level_zero)


def probe_training_step(model, views, labels) -> LevelZeroFeatures | None:
    """What ``training_step`` computes, in its order, without a Trainer: the loss, the probe's step, backward."""
    model.seed_montages(0)
    level_zero = level_zero_features(model)
    loss, _ = losses(model, views, labels, level_zero)
    if level_zero is not None:
        model.online_probe.step(*level_zero.batch(labels))
    loss.backward()
    return level_zero


CASES = [("mcl", case) for case in MCL_CASES] + [("supervised", case) for case in SUPERVISED_CASES]


@pytest.mark.parametrize(("method", "case"), CASES)
def test_the_model_gradients_and_statistics_are_bit_identical_with_and_without_the_probe(method, case):
    without, with_probe = build(method, case, probe=False), build(method, case, probe=True)
    views, labels = batch(without)
    assert probe_training_step(without, views, labels) is None
    level_zero = probe_training_step(with_probe, views, labels)
    features, targets = level_zero.batch(labels)
    sides = 2 if method == "mcl" else 1
    assert features.shape == (sides * len(views), with_probe.backbone.channels[-1]) and not features.requires_grad
    assert targets.shape == (sides * len(views),)
    probed = dict(with_probe.named_parameters())
    for name, parameter in without.named_parameters():  # every parameter of the model, backbone and all
        if parameter.grad is None:
            assert probed[name].grad is None, name
        else:
            assert torch.equal(parameter.grad, probed[name].grad), name
    assert all(probed[key].grad is None for key in PROBE_KEYS)  # the probe's gradients are gone after its step
    buffers = dict(with_probe.named_buffers())
    for name, buffer in without.named_buffers():  # BatchNorm running statistics: no extra forward pass
        assert torch.equal(buffer, buffers[name]), name


@pytest.mark.parametrize(("method", "case"), CASES)
def test_the_probe_reads_each_level_zero_view_with_its_own_label(method, case):
    """In eval mode a view's features do not depend on its batch: the level-0 features the pass hands the probe are
    the pooled C5 of each side's views, in the order of the level-0 montages' sources, beside those images' labels."""
    model = build(method, case, probe=True).eval()
    views, labels = batch(model)
    model.seed_montages(0)
    level_zero = level_zero_features(model)
    with torch.no_grad():
        losses(model, views, labels, level_zero)
        features, targets = level_zero.batch(labels)
        sides = views.unbind(1) if method == "mcl" else [views]
        pairs = zip(sides, level_zero.sources, strict=True)
        expected = [pool(model.backbone(side[:, 0])[-1])[sources] for side, sources in pairs]
    assert torch.allclose(features, torch.cat(expected), atol=1e-5)
    assert torch.equal(targets, labels[torch.cat(level_zero.sources)])
    assert all(sorted(sources.tolist()) == list(range(len(views))) for sources in level_zero.sources)


def configured_optimizer(model) -> torch.optim.Optimizer:
    model._trainer = SimpleNamespace(
        estimated_stepping_batches=10,
        max_epochs=1,
        datamodule=SimpleNamespace(batch_size=4),
        world_size=1,
        accumulate_grad_batches=1,
    )
    try:
        return model.configure_optimizers()["optimizer"]
    finally:
        model._trainer = None


@pytest.mark.parametrize("method", ["mcl", "supervised"])
def test_the_probe_learns_with_its_own_optimizer_and_leaves_the_model_alone(method):
    model = build(method, "per_side" if method == "mcl" else "tiles", probe=True)
    optimized = {id(p) for group in configured_optimizer(model).param_groups for p in group["params"]}
    probe_parameters = {id(p) for p in model.online_probe.parameters()}
    assert not optimized & probe_parameters
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad} - probe_parameters
    views, labels = batch(model)
    level_zero = level_zero_features(model)
    losses(model, views, labels, level_zero)
    features, targets = level_zero.batch(labels)
    model_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("online_probe.")}
    losses_seen = []
    for _ in range(5):
        loss, top1 = model.online_probe.step(features, targets)
        losses_seen.append(float(loss))
        assert 0 <= float(top1) <= 100
    assert model.online_probe.classifier.weight.abs().sum() > 0  # zero at the start
    assert losses_seen[-1] < losses_seen[0]
    for key, value in model.state_dict().items():
        if key in model_before:
            assert torch.equal(value, model_before[key]), key


def test_with_the_probe_off_the_state_dict_keys_are_unchanged_and_a_probe_checkpoint_loads(tmp_path):
    off = small_mcl(levels=2)
    keys = set(off.state_dict())
    assert not any("probe" in key for key in keys) and off.online_probe is None
    assert level_zero_features(off) is None
    assert set(small_mcl(levels=2, online_probe=True).state_dict()) == keys  # built in setup("fit") only
    on = build("mcl", "per_side", probe=True)
    assert set(on.state_dict()) == keys | PROBE_KEYS
    views, labels = batch(on)
    level_zero = probe_training_step(on, views, labels)
    on.online_probe.step(*level_zero.batch(labels))
    checkpoint = {"state_dict": on.state_dict(), "hyper_parameters": dict(on.hparams)}
    on.on_save_checkpoint(checkpoint)
    OnlineProbeCallback(on.probe_settings).on_save_checkpoint(None, on, checkpoint)  # the probe's SGD state
    path = tmp_path / "probe.ckpt"
    torch.save(checkpoint, path)

    loaded = MCL.load_from_checkpoint(path)  # outside fit: the probe is rebuilt from the checkpoint's weights
    assert torch.equal(loaded.online_probe.classifier.weight, on.online_probe.classifier.weight)
    resumed_sgd = loaded.online_probe.build_optimizer().state_dict()
    saved_sgd = on.online_probe.optimizer.state_dict()
    for index, state in saved_sgd["state"].items():
        assert torch.equal(resumed_sgd["state"][index]["momentum_buffer"], state["momentum_buffer"])
    without = MCL.load_from_checkpoint(path, online_probe=False)  # turned off: the probe's weights are left out
    assert without.online_probe is None and set(without.state_dict()) == keys
    fresh = build("mcl", "per_side", probe=True)  # turned on over a checkpoint without one: a fresh probe
    plain = save_checkpoint(off, tmp_path / "plain.ckpt")
    fresh.on_load_checkpoint(plain_checkpoint := torch.load(plain, weights_only=False))
    fresh.load_state_dict(plain_checkpoint["state_dict"])
    assert fresh.online_probe.classifier.weight.abs().sum() == 0
    other = build("mcl", "per_side", probe=False)
    other.probe_settings = on.probe_settings
    attach_probe(other, other.probe_settings, CLASSES + 1)
    with pytest.raises(ValueError, match="online probe has 4 classes, the training data 5"):
        other.on_load_checkpoint(torch.load(path, weights_only=False))


def test_unlabelled_training_data_is_refused_naming_the_key(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    cfg = compose_train(
        ["data=folder", f"data.root={photos}", "method.online_probe=true", "logger=none"], output_dir=tmp_path / "run"
    )
    with pytest.raises(ValueError, match="method.online_probe=true .* FolderDataModule has no labels"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run folder was touched


@pytest.mark.slow
def test_a_run_with_the_probe_logs_its_metrics_and_resumes(tiny_cfg):
    cfg = tiny_cfg("method.online_probe=true", "validate_at_init=false")
    metrics = train(cfg)
    for key in ("train/online_top1", "val/online_top1"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["train/online_loss"] > 0
    assert json.loads((Path(cfg.output_dir) / "metrics.json").read_text()) == pytest.approx(metrics)
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=False)
    assert set(first["state_dict"]) >= PROBE_KEYS and first[OPTIMIZER_STATE]["state"]
    train(tiny_cfg("method.online_probe=true", f"ckpt_path={last}", "trainer.max_epochs=2"))
    second = torch.load(last, weights_only=False)
    assert second["global_step"] == 8
    weight = "online_probe.classifier.weight"
    assert not torch.equal(first["state_dict"][weight], second["state_dict"][weight])
