"""Run folders that never lose or mix results: reruns, locks, divergence, resumes and unreadable checkpoints."""

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcl.checkpoints import load_checkpoint
from mcl.methods.base import MultiLevelModule
from mcl.runs import LOCK_FILE, STATE_FILE, RunFolderBusy, RunLock, read_json, write_json
from mcl.train import train

from .conftest import compose_train


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def last_step(cfg) -> int:
    return load_checkpoint(Path(cfg.output_dir) / "checkpoints" / "last.ckpt")["global_step"]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_names_the_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    with RunLock(tmp_path), pytest.raises(RunFolderBusy, match=r"in use by process \d+ on .*started"):
        RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    left_behind = {"host": socket.gethostname(), "pid": dead_pid(), "started": "earlier"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(left_behind))
    with caplog.at_level(logging.WARNING), RunLock(tmp_path) as lock:
        assert read_json(tmp_path / LOCK_FILE)["pid"] == lock.holder["pid"]
    assert "which no longer runs" in caplog.text


def test_write_json_replaces_whole_files(tmp_path):
    path = write_json({"a": 1}, tmp_path / "m.json")
    write_json({"a": 2}, path)
    assert read_json(path) == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["m.json"]


@pytest.mark.slow
def test_finished_run_rerun_does_nothing_and_more_epochs_continue(tiny_cfg, caplog):
    cfg = tiny_cfg("validate_at_init=true")
    first = train(cfg)
    folder = Path(cfg.output_dir)
    before = folder_files(folder)
    with caplog.at_level(logging.WARNING):
        again = train(tiny_cfg("validate_at_init=true"))
    assert "already holds a finished run" in caplog.text
    assert again == pytest.approx(first)
    assert folder_files(folder) == before  # nothing rewritten
    more = train(tiny_cfg("validate_at_init=true", "trainer.max_epochs=2"))
    assert last_step(cfg) == 8
    assert more["init/knn_top1"] == first["init/knn_top1"]  # kept from the first run
    assert read_json(folder / STATE_FILE)["status"] == "finished"


@pytest.mark.slow
@pytest.mark.parametrize("override", ["levels=5", "ckpt_path=/nowhere/last.ckpt", "loss.level_weights=[0,0,0]"])
def test_a_failing_rerun_leaves_every_file_as_it_was(tiny_cfg, override):
    cfg = tiny_cfg("validate_at_init=false")
    train(cfg)
    before = folder_files(Path(cfg.output_dir))
    with pytest.raises(Exception, match="levels=5|does not exist|every level weight is 0"):
        train(tiny_cfg("validate_at_init=false", "trainer.max_epochs=2", override))
    assert folder_files(Path(cfg.output_dir)) == before


@pytest.mark.slow
def test_a_second_run_in_a_busy_folder_is_refused(tiny_cfg):
    cfg = tiny_cfg("validate_at_init=false")
    with RunLock(cfg.output_dir), pytest.raises(RunFolderBusy, match="in use by process"):
        train(cfg)
    assert not (Path(cfg.output_dir) / "checkpoints").exists()


@pytest.mark.slow
def test_starting_over_in_a_folder_with_results_is_refused(tiny_cfg):
    cfg = tiny_cfg("validate_at_init=false")
    train(cfg)
    with pytest.raises(FileExistsError, match="holds the results of an earlier run"):
        train(tiny_cfg("validate_at_init=false", "auto_resume=false"))


@pytest.mark.slow
def test_diverged_weights_are_never_saved_and_the_message_names_the_good_checkpoint(tiny_cfg):
    cfg = tiny_cfg("validate_at_init=false")
    train(cfg)
    good = load_checkpoint(Path(cfg.output_dir) / "checkpoints" / "last.ckpt")
    diverging = tiny_cfg(
        "validate_at_init=false",
        "trainer.max_epochs=2",
        "optimizer=sgd",
        "optimizer.lr=1e12",
        "callbacks.last.every_n_train_steps=1",
    )
    with pytest.raises(FloatingPointError, match=r"(diverged|non-finite).*last\.ckpt \(step 4\)") as error:
        train(diverging)
    assert "passed the weight check" in str(error.value)
    for path in (Path(cfg.output_dir) / "checkpoints").glob("*.ckpt"):
        state = load_checkpoint(path)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert last_step(cfg) == good["global_step"] == 4
    assert read_json(Path(cfg.output_dir) / STATE_FILE)["status"] == "failed"


@pytest.mark.slow
def test_a_new_learning_rate_applies_on_resume(tiny_cfg, caplog):
    cfg = tiny_cfg("validate_at_init=false", "optimizer.lr=0.5")
    train(cfg)
    with caplog.at_level(logging.WARNING):
        train(tiny_cfg("validate_at_init=false", "optimizer.lr=1.0", "trainer.max_epochs=2"))
    assert "applying: lr 0.03125 -> 0.0625" in caplog.text  # 0.5 and 1.0 x batch 16 / 256
    groups = load_checkpoint(Path(cfg.output_dir) / "checkpoints" / "last.ckpt")["optimizer_states"][0]["param_groups"]
    assert all(group["initial_lr"] == pytest.approx(0.0625) for group in groups)


@pytest.mark.slow
def test_an_unreadable_last_checkpoint_resumes_from_the_newest_readable_one(tiny_cfg, caplog):
    cfg = tiny_cfg("validate_at_init=false", "trainer.max_epochs=2")
    train(cfg)
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # a kill mid-write on a file system without rename
    with caplog.at_level(logging.WARNING):
        train(tiny_cfg("validate_at_init=false", "trainer.max_epochs=3"))
    assert "last.ckpt cannot be read; resuming from" in caplog.text
    assert last_step(cfg) == 12


@pytest.mark.slow
def test_a_checkpoint_of_another_architecture_names_the_differences(tiny_cfg):
    cfg = tiny_cfg("validate_at_init=false")
    train(cfg)
    with pytest.raises(ValueError, match=r"levels: checkpoint 3, config 2"):
        train(tiny_cfg("validate_at_init=false", "levels=2", "trainer.max_epochs=2"))


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path, monkeypatch):
    """A 2-epoch run stopped after its first epoch (as a kill right after the epoch's checkpoint would) and resumed
    ends with the loss of the same run done in one go: same data order, augmentations, montages and schedule."""
    base = ["data=synthetic", "batch_size=16", "logger=none", "validate_at_init=false", "neck.out_channels=16",
            "method.projector_hidden_dim=32", "method.embedding_dim=16", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "trainer.max_epochs=2"]  # fmt: skip
    straight = train(compose_train(base, output_dir=tmp_path / "straight"))
    original = MultiLevelModule.on_train_epoch_end

    def stop_after_first_epoch(self):
        original(self)
        self.trainer.should_stop = True

    with monkeypatch.context() as patch:
        patch.setattr(MultiLevelModule, "on_train_epoch_end", stop_after_first_epoch)
        train(compose_train(base, output_dir=tmp_path / "resumed"))
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == 4
    resumed = train(compose_train(base, output_dir=tmp_path / "resumed"))
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == 8
    assert resumed["train/loss"] == pytest.approx(straight["train/loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("backbone.name=resnet5o", "backbone.name='resnet5o' is not a timm model; close timm names: resnet50"),
        ("batch_size=1", "batch_size=1 on 1 device"),
        ("loss.level_weights=[0,0,0]", "every level weight is 0"),
    ],
)
def test_configs_that_would_train_nothing_or_crash_late_are_refused(tiny_cfg, override, message):
    with pytest.raises(Exception, match=message.replace("[", r"\[")):
        train(tiny_cfg("validate_at_init=false", "data.num_train=16", override))


@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_run(tiny_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg("validate_at_init=false", "logger=wandb")
    train(cfg)
    first = read_json(Path(cfg.output_dir) / STATE_FILE)["wandb_id"]
    train(tiny_cfg("validate_at_init=false", "logger=wandb", "trainer.max_epochs=2"))
    assert read_json(Path(cfg.output_dir) / STATE_FILE)["wandb_id"] == first
    runs = {p.name.rsplit("-", 1)[-1] for p in Path(cfg.output_dir).rglob("offline-run-*")}
    assert runs == {first}
