"""Run folders that never lose or mix results: reruns, locks, divergence, resumes and unreadable checkpoints."""

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcl.checkpoints import LastCheckpoint, load_checkpoint
from mcl.interrupts import RunInterrupted
from mcl.runs import (
    LOCK_FILE,
    MIB,
    STATE_FILE,
    NoSpaceLeft,
    RunFolderBusy,
    RunLock,
    RunLogFile,
    open_run_logs,
    read_json,
    remove_stale_temporaries,
    replaced_atomically,
    write_json,
)
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


def test_only_this_librarys_stale_temporary_files_are_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / "checkpoints" / ".last.ckpt.4242.tmp", tmp_path / ".run.json.17.tmp"]
    kept = [tmp_path / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / ".last.ckpt.tmp", tmp_path / "x.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert [p for p in stale + kept if p.exists()] == kept


def test_a_full_device_is_named_with_the_file_the_space_free_and_needed(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"0" * 3 * MIB)  # the previous checkpoint: about what the new one needs
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100 * MIB, 99 * MIB, MIB // 2))
    with pytest.raises(NoSpaceLeft) as error, replaced_atomically(target) as temporary:
        temporary.write_bytes(b"1" * MIB)
        raise RuntimeError("[enforce fail at inline_container.cc:603] unexpected pos; basic_ios::clear: iostream error")
    message = str(error.value)
    assert error.value.errno == errno.ENOSPC
    assert f"device of {tmp_path} while writing last.ckpt: 1.0 MiB written, 0.5 MiB free" in message
    assert "it needs about 3.0 MiB" in message and "The previous last.ckpt (if any) is unchanged" in message
    assert target.read_bytes() == b"0" * 3 * MIB and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    # The same library error on a device with room left is not called a full disk.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100 * MIB, MIB, 99 * MIB))
    with pytest.raises(RuntimeError, match="iostream error"), replaced_atomically(target):
        raise RuntimeError("basic_ios::clear: iostream error")


def test_a_folder_that_cannot_be_written_is_named_before_anything_else(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(PermissionError, match=f"the run folder {tmp_path} cannot be written \\(Permission denied\\)"):
        RunLock(tmp_path).acquire()


def test_the_run_log_holds_its_lines_until_the_run_owns_the_folder(tmp_path):
    handler = RunLogFile(tmp_path / "train.log")
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("mcl.test_run_log")
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        logger.warning("before %d", 1)
        assert not (tmp_path / "train.log").exists()  # a refused run leaves no trace
        assert open_run_logs() == [tmp_path / "train.log"]
        logger.warning("after")
        assert (tmp_path / "train.log").read_text() == "WARNING before 1\nWARNING after\n"
    finally:
        root.removeHandler(handler)
        handler.close()


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


FAILING_RERUNS = {
    "levels=5": "levels=5",
    "ckpt_path=/nowhere/last.ckpt": "does not exist",
    "loss.level_weights=[0,0,0]": "every level weight is 0",
    "batch_size=1": "batch_size=1 on 1 device",
    "data.num_train=8": "8 images, fewer than data.batch_size=16",
    "optimizer.lr=0": r"optimizer.lr=0 is out of range: the base learning rate must be a number > 0",
    "optimizer.momentum=1.5": r"optimizer.momentum=1.5 is out of range: .* in \[0, 1\)",
    "optimizer.weight_decay=-1": r"optimizer.weight_decay=-1 is out of range: .* >= 0",
    "seed=-1": r"seed=-1 is out of range: .* integer in \[0, 4294967295\]",
    "trainer.max_epochs=0": r"trainer.max_epochs=0 is out of range: .* integer >= 1",
    "method.knn_k=0": r"method.knn_k=0 is out of range: .* integer >= 1",
    "lr_reference_batch=0": r"lr_reference_batch=0 is out of range: .* > 0 or null",
}


@pytest.mark.slow
def test_a_failing_rerun_leaves_every_file_as_it_was(tiny_cfg):
    """Every check (config values, the model, the data's set-up, the resume) runs before the folder changes."""
    cfg = tiny_cfg("validate_at_init=false")
    train(cfg)
    before = folder_files(Path(cfg.output_dir))
    for override, message in FAILING_RERUNS.items():
        with pytest.raises(Exception, match=message.replace("[0,0,0]", r"\[0,0,0\]")):
            train(tiny_cfg("validate_at_init=false", "trainer.max_epochs=2", override))
        assert folder_files(Path(cfg.output_dir)) == before, override


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
def test_a_run_stopped_by_signals_mid_epoch_resumes_exactly(tmp_path, monkeypatch):
    """SIGINT at step 2 and SIGTERM at step 6 of a 2-epoch run (4 steps an epoch): each saves last.ckpt at that step,
    marks the run interrupted and exits with 128 + the signal; the same command resumes it, and the run ends with the
    weights of the same run done in one go (same data order and views for the rest of each epoch, montages, schedule).
    """
    base = ["data=synthetic", "batch_size=16", "logger=none", "validate_at_init=false", "neck.out_channels=16",
            "method.projector_hidden_dim=32", "method.embedding_dim=16", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "trainer.max_epochs=2"]  # fmt: skip
    train(compose_train(base, output_dir=tmp_path / "straight"))
    folder = tmp_path / "stopped"
    original = LastCheckpoint.on_train_batch_end
    for signum, step in ((signal.SIGINT, 2), (signal.SIGTERM, 6)):

        def signal_at(self, trainer, *args, signum=signum, step=step):
            original(self, trainer, *args)
            if trainer.global_step == step:
                os.kill(os.getpid(), signum)

        with monkeypatch.context() as patch:
            patch.setattr(LastCheckpoint, "on_train_batch_end", signal_at)
            with pytest.raises(RunInterrupted) as stopped:
                train(compose_train(base, output_dir=folder))
        assert stopped.value.code == 128 + signum
        assert load_checkpoint(folder / "checkpoints" / "last.ckpt")["global_step"] == step
        assert read_json(folder / STATE_FILE)["status"] == "interrupted"
    train(compose_train(base, output_dir=folder))
    assert read_json(folder / STATE_FILE)["status"] == "finished"
    resumed = load_checkpoint(folder / "checkpoints" / "last.ckpt")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == straight["global_step"] == 8
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


@pytest.mark.slow
def test_a_backbone_name_that_timm_lacks_is_refused_with_close_names(tiny_cfg):
    with pytest.raises(Exception, match="backbone.name='resnet5o' is not a timm model; close timm names: resnet50"):
        train(tiny_cfg("validate_at_init=false", "data.num_train=16", "backbone.name=resnet5o"))


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
