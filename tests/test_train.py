"""End to end through Hydra and Lightning: short runs, checkpoints, resume, failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from PIL import Image

from mcl.methods import MCL
from mcl.results import collect_multirun
from mcl.train import train

pytestmark = pytest.mark.slow


def checkpoint_dir(cfg) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


@pytest.mark.parametrize("backbone", ["resnet18", "swin_test"])
def test_short_run_trains_and_reports_knn(tiny_cfg, backbone):
    optimizer = ["optimizer=adamw"] if "swin" in backbone else ["optimizer=lars"]
    cfg = tiny_cfg(f"backbone={backbone}", *optimizer)
    metrics = train(cfg)
    assert 0.0 <= metrics["init/knn_top1"] <= 100.0
    assert 0.0 <= metrics["val/knn_top1"] <= 100.0
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert (checkpoint_dir(cfg) / "last.ckpt").is_file()


@pytest.mark.parametrize("backbone", ["resnet18", "swin_test"])
def test_supervised_short_run_reports_per_level_accuracy(tiny_cfg, backbone):
    optimizer = ["optimizer=adamw"] if "swin" in backbone else []
    cfg = tiny_cfg("method=supervised", "method.num_classes=4", f"backbone={backbone}", *optimizer)
    metrics = train(cfg)
    for key in ("val/acc", "val/acc_level0", "val/acc_level1", "val/acc_level2", "val/knn_top1"):
        assert 0.0 <= metrics[key] <= 100.0
    checkpoint = torch.load(checkpoint_dir(cfg) / "last.ckpt", weights_only=False)
    prefixes = {key.split(".")[0] for key in checkpoint["state_dict"]}
    assert {"backbone", "neck", "head", "classifier"} <= prefixes  # the trunk is named as in MCL checkpoints
    assert checkpoint["hyper_parameters"]["levels"] == 3


@pytest.mark.parametrize("method", ["mcl", "supervised"])
def test_short_run_with_views_made_on_the_device(tiny_cfg, method):
    # On this CPU-only machine "the device" is the CPU: the same path a GPU run takes after the batch transfer.
    extra = ["method=supervised", "method.num_classes=4"] if method == "supervised" else []
    cfg = tiny_cfg("data.augment_on=device", *extra)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert 0.0 <= metrics["val/knn_top1"] <= 100.0
    assert (checkpoint_dir(cfg) / "last.ckpt").is_file()


def test_supervised_labels_beyond_the_classifier_name_the_key(tiny_cfg):
    with pytest.raises(ValueError, match="set method.num_classes"):
        train(tiny_cfg("method=supervised", "method.num_classes=3", "validate_at_init=false"))


def test_ema_runs_after_each_optimizer_step(tiny_cfg, monkeypatch):
    """Every optimiser step moves the target to ``m * target + (1 - m) * online`` with the scheduled momentum, and
    the checkpoint holds the target of the last update (a frozen copy of the initial weights would not be)."""
    updates = []
    update_target = MCL.update_target

    def recorded(model, momentum):
        before = [p.detach().clone() for p in model.target_backbone.parameters()]
        update_target(model, momentum)
        online = [p.detach().clone() for p in model.backbone.parameters()]
        after = [p.detach().clone() for p in model.target_backbone.parameters()]
        updates.append((momentum, before, online, after))

    monkeypatch.setattr(MCL, "update_target", recorded)
    cfg = tiny_cfg("+trainer.max_steps=2", "validate_at_init=false")
    train(cfg)
    checkpoint = torch.load(checkpoint_dir(cfg) / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert len(updates) == 2  # once per optimiser step
    for momentum, before, online, after in updates:
        assert momentum < 1
        for b, o, a in zip(before, online, after, strict=True):
            exact = momentum * b.double() + (1 - momentum) * o.double()
            torch.testing.assert_close(a.double(), exact, rtol=1e-6, atol=1e-8)
        assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    model = MCL.load_from_checkpoint(checkpoint_dir(cfg) / "last.ckpt")
    for saved, last in zip(model.target_backbone.parameters(), updates[-1][-1], strict=True):
        assert torch.equal(saved, last)
    assert checkpoint["montage_generator_states"].shape[0] == 1  # one row per rank


def test_resume_continues_from_the_checkpoint(tiny_cfg):
    cfg = tiny_cfg("validate_at_init=false")
    train(cfg)
    last = checkpoint_dir(cfg) / "last.ckpt"
    first = torch.load(last, weights_only=False)
    assert first["epoch"] == 0 and first["global_step"] == 4  # 64 images / batch 16
    resumed = tiny_cfg(f"ckpt_path={last}", "trainer.max_epochs=2")
    train(resumed)
    second = torch.load(last, weights_only=False)
    assert second["global_step"] == 8  # 4 steps restored + 4 new ones, not 4 from scratch
    # A requeued job reruns in its own folder without ckpt_path: auto_resume picks up last.ckpt.
    metrics = train(tiny_cfg("trainer.max_epochs=3"))
    assert torch.load(last, weights_only=False)["global_step"] == 12
    assert json.loads((Path(cfg.output_dir) / "metrics.json").read_text()) == pytest.approx(metrics)


def test_an_interp_checkpoint_saved_before_neck_stage_existed_is_refused_with_what_to_add():
    from types import SimpleNamespace

    from mcl.checkpoints import RetiredCheckpointError
    from mcl.train import check_compatible

    retired = {"hyper_parameters": {"neck": {"name": "interp", "out_channels": 32}, "levels": 3}}
    today = SimpleNamespace(hparams={"neck": {"name": "interp", "out_channels": 32, "stage": 5}, "levels": 3})
    with pytest.raises(RetiredCheckpointError, match="old.ckpt was written by mcl 0.2 or earlier .* add 'stage': 5"):
        check_compatible(retired, "old.ckpt", today)
    on_c4 = SimpleNamespace(hparams={"neck": {"name": "interp", "out_channels": 32, "stage": 4}, "levels": 3})
    updated = {"hyper_parameters": {"neck": {"name": "interp", "out_channels": 32, "stage": 5}, "levels": 3}}
    check_compatible(updated, "new.ckpt", today)
    with pytest.raises(ValueError, match="neck: checkpoint .* config .*'stage': 4"):
        check_compatible(updated, "new.ckpt", on_c4)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("validate_at_init=false", "trainer.max_epochs=2")
    original = MCL.forward_losses

    def poisoned(self, views, level_zero=None):
        loss, logs = original(self, views, level_zero)
        return (loss * float("nan") if self.current_epoch == 1 else loss), logs

    monkeypatch.setattr(MCL, "forward_losses", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        train(cfg)
    checkpoint = torch.load(checkpoint_dir(cfg) / "last.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("levels=5", "levels=5"),
        ("image_size=80", "image_size=80"),
        ("loss.level_weights=[0.5,0.25]", "level_weights="),
        ("method.montage_counts=[16,4]", "montage_counts="),
    ],
)
def test_bad_config_values_name_the_key(tiny_cfg, override, message):
    with pytest.raises((ValueError, InstantiationException), match=message.replace("[", r"\[")):
        train(tiny_cfg(override))


def test_missing_fashion_mnist_says_how_to_install(tiny_cfg, tmp_path):
    cfg = tiny_cfg("data=fashion_mnist", f"data.root={tmp_path / 'nowhere'}", "data.num_workers=0")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        train(cfg)


def write_image_folder(root: Path, classes=2, per_class=8, size=32) -> None:
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            Image.new("RGB", (size, size), (40 * label, 10 * index, 90)).save(folder / f"{index}.png")


def test_image_folder_errors_name_the_folder_and_the_file(tiny_cfg, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["data=imagefolder", "data.num_workers=0", "batch_size=8", "data.bank_size=null"]
    with pytest.raises(FileNotFoundError, match=str(empty)):
        train(tiny_cfg(*base, f"data.train_dir={empty}", f"data.val_dir={empty}"))
    good = tmp_path / "good"
    write_image_folder(good)
    (good / "class1" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(OSError, match="unreadable image .*broken.png"):
        train(tiny_cfg(*base, f"data.train_dir={good}", f"data.val_dir={good}", "validate_at_init=false"))


def test_multirun_gives_each_job_its_own_folder_wandb_run_and_results_row(tmp_path):
    command = [
        str(Path(sys.executable).parent / "mcl-train"), "--multirun", "levels=1,2", "data=synthetic", "batch_size=8",
        "logger=wandb", "validate_at_init=false", "+trainer.max_steps=1", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "method.projector_hidden_dim=32", "neck.out_channels=16",
        f"hydra.sweep.dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert [job.split("_")[0] for job in jobs] == ["0", "1"]
    assert jobs[0].startswith("0_levels=1,+trainer.max_steps=1,") and jobs[1].startswith("1_levels=2,")  # swept first
    runs = []
    for job in jobs:
        assert (tmp_path / job / "checkpoints" / "last.ckpt").is_file()
        (run,) = (tmp_path / job / "wandb").glob("offline-run-*")  # one W&B run per job, in the job's folder
        runs.append(run.name.rsplit("-", 1)[-1])
    assert runs[0] != runs[1]
    table = collect_multirun(tmp_path)
    assert table["levels"].tolist() == [1, 2]
    assert table["status"].tolist() == ["finished", "finished"]
    assert table["train/loss"].gt(0).all()
