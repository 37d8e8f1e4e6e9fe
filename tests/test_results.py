"""Results collection over multirun folders and W&B projects (with a stand-in API)."""

import json
import math
import os
import socket
from types import SimpleNamespace

import pytest
import yaml

from mcl.results import (
    collect_multirun,
    collect_wandb,
    compare_nested,
    job_status,
    main,
    nested_mean_se,
    parse_override,
    read_job,
)
from mcl.runs import LOCK_FILE, STATE_FILE


def fake_job(root, name, overrides, metrics=None, csv_rows=None, config=None, state=None, lock=None):
    """A job folder as mcl-train leaves it: ``state`` is run.json's status, ``lock`` the lock file's content."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config or {}))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if state is not None:
        (job / STATE_FILE).write_text(json.dumps({"status": state, "max_epochs": 3, "wandb_id": None}))
    if lock is not None:
        (job / LOCK_FILE).write_text(lock if isinstance(lock, str) else json.dumps(lock))
    if csv_rows is not None:
        (job / "csv" / "version_0").mkdir(parents=True)
        (job / "csv" / "version_0" / "metrics.csv").write_text(csv_rows)
    return job


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("levels=2", ("levels", 2)),
        ("loss.target_assignment=same-level", ("loss.target_assignment", "same-level")),
        ("+trainer.max_steps=5", ("trainer.max_steps", 5)),
        ("loss.temperature=0.2", ("loss.temperature", 0.2)),
        ("loss.level_weights=[0.5,0.5]", ("loss.level_weights", "[0.5,0.5]")),
        ("optimizer.lr=1e-3", ("optimizer.lr", 0.001)),
        ("trainer.sync_batchnorm=False", ("trainer.sync_batchnorm", False)),
        ("ckpt_path=null", ("ckpt_path", None)),
    ],
)
def test_parse_override(override, expected):
    assert parse_override(override) == expected


def test_multirun_table_has_a_row_per_job_in_job_order(tmp_path):
    config = {"levels": 3, "loss": {"target_assignment": "top", "levels": "${levels}"}, "out": "${hydra:runtime}"}
    for num in (10, 2, 1):  # folder order would put 10 before 2
        fake_job(tmp_path, f"{num}_levels={num}", [f"levels={num}"], {"val/knn_top1": 60.0 + num}, config=config)
    fake_job(
        tmp_path, "3_levels=3", ["levels=3"], csv_rows="epoch,step,val/knn_top1,train/loss\n0,9,55.5,\n0,10,,7.0\n"
    )
    frame = collect_multirun(tmp_path, config_keys=["loss.target_assignment", "loss.levels", "out"])
    assert frame["job"].tolist() == ["1_levels=1", "2_levels=2", "3_levels=3", "10_levels=10"]
    assert frame["levels"].tolist() == [1, 2, 3, 10]
    assert frame["status"].tolist() == [
        "finished",
        "finished",
        "unfinished",
        "finished",
    ]  # no run.json: by metrics.json
    assert frame["val/knn_top1"].tolist() == [61.0, 62.0, 55.5, 70.0]
    assert frame.loc[2, "train/loss"] == 7.0  # the last value the CSV log holds
    assert frame["loss.target_assignment"].fillna("-").tolist() == ["top", "top", "-", "top"]
    assert frame["loss.levels"].tolist()[:2] == [3, 3]  # interpolations resolved
    assert frame["out"].tolist()[0] == "${hydra:runtime}"  # Hydra-only interpolations stay as written


def a_gone_pid():
    """The pid of a process that has exited (a child that was waited for)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


CSV = "epoch,step,val/knn_top1,train/loss\n0,9,55.5,\n0,10,,7.0\n"


def test_status_comes_from_run_json_then_the_lock(tmp_path):
    here = socket.gethostname()
    alive = {"host": here, "pid": os.getpid(), "started": "2026-11-26 16:00:00", "command": "mcl-train"}
    gone = {**alive, "pid": a_gone_pid()}
    elsewhere = {**gone, "host": here + "-other-node"}
    cases = {
        "finished": dict(state="finished", metrics={"val/knn_top1": 61.0}),
        "failed": dict(state="failed", csv_rows=CSV),
        "interrupted": dict(state="interrupted", csv_rows=CSV),
        "running": dict(state="running", lock=alive, csv_rows=CSV),
        "running_elsewhere": dict(state="running", lock=elsewhere),
        "running_lock_being_written": dict(state="running", lock=""),
        "dead_no_lock": dict(state="running", csv_rows=CSV),
        "dead_gone_process": dict(state="running", lock=gone),
        "finished_no_run_json": dict(metrics={"val/knn_top1": 61.0}),  # mcl-linear, mcl-finetune, older runs
        "unfinished_no_run_json": dict(csv_rows=CSV),
        "running_before_run_json": dict(lock=alive),
        "dead_before_run_json": dict(lock=gone),
    }
    for name, files in cases.items():
        job = fake_job(tmp_path, name, ["levels=1"], **files)
        assert job_status(job) == name.split("_")[0], name


def test_a_rerun_takes_its_status_from_run_json_not_the_old_metrics(tmp_path):
    """metrics.json of an earlier finished run stays while a resumed run is under way or after it failed: the row
    says what run.json says, with the newer values of the CSV log; a finished run whose rerun stopped at its checks
    (run.json untouched) stays finished with its metrics."""
    old = {"val/knn_top1": 50.0, "init/knn_top1": 10.0}
    failed = read_job(fake_job(tmp_path, "0_failed", ["levels=1"], metrics=old, state="failed", csv_rows=CSV))
    assert failed["status"] == "failed" and failed["val/knn_top1"] == 55.5 and failed["train/loss"] == 7.0
    dead = read_job(fake_job(tmp_path, "1_dead", ["levels=1"], metrics=old, state="running", csv_rows=CSV))
    assert dead["status"] == "dead" and dead["val/knn_top1"] == 55.5
    kept = read_job(fake_job(tmp_path, "2_kept", ["levels=1"], metrics=old, state="finished", csv_rows=CSV))
    assert kept["status"] == "finished" and kept["val/knn_top1"] == 50.0 and kept["init/knn_top1"] == 10.0


def test_missing_or_empty_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results folder at .*nowhere"):
        collect_multirun(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no Hydra run"):
        collect_multirun(tmp_path)
    assert main([str(tmp_path / "nowhere")]) == 2


def test_cli_prints_markdown_sorted_and_writes_csv(tmp_path, capsys):
    fake_job(tmp_path, "0_levels=1", ["levels=1"], {"val/knn_top1": 61.0})
    fake_job(tmp_path, "1_levels=2", ["levels=2"], {"val/knn_top1": 64.5})
    assert main([str(tmp_path), "--markdown", "--sort", "val/knn_top1", "--csv", str(tmp_path / "t.csv")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "val/knn_top1" in lines[0] and "64.50" in lines[2] and "61.00" in lines[3]
    assert (tmp_path / "t.csv").read_text().splitlines()[1].startswith("1_levels=2")
    assert main([str(tmp_path), "--sort", "val/acc"]) == 2


def test_wandb_project_rows_from_run_config_and_summary():
    runs = [
        SimpleNamespace(
            name="mcl/levels=2",
            group="mcl/2026-11-26_16-00-00",
            state="finished",
            config={"levels": 2, "loss": {"_target_": "mcl.loss.MultiLevelInfoNCE", "target_assignment": "same-level"}},
            summary={"val/knn_top1": 63.5, "_step": 270, "graph": {"a": 1}},
        )
    ]
    calls = []
    api = SimpleNamespace(runs=lambda project, filters: calls.append((project, filters)) or runs)
    frame = collect_wandb("me/mcl", filters={"group": "mcl/2026-11-26_16-00-00"}, api=api)
    assert calls == [("me/mcl", {"group": "mcl/2026-11-26_16-00-00"})]
    assert frame.to_dict("records") == [
        {
            "job": "mcl/levels=2",
            "group": "mcl/2026-11-26_16-00-00",
            "status": "finished",
            "levels": 2,
            "loss.target_assignment": "same-level",
            "loss._target_": "mcl.loss.MultiLevelInfoNCE",
            "val/knn_top1": 63.5,
        }
    ]


def test_collect_wandb_without_a_key_says_how_to_get_one(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no stored key either
    assert main(["me/mcl", "--wandb"]) == 2
    assert "--wandb reads runs from the W&B servers and needs an API key: run `wandb login`" in capsys.readouterr().err


def test_nested_spread_counts_each_pretraining_once_and_holds_its_spread():
    # Two pretraining seeds, three fine-tuning seeds each: group means 2 and 4.
    mean, se = nested_mean_se([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    assert mean == 3.0 and se == pytest.approx(math.sqrt(2) / math.sqrt(2))
    # One group: the fine-tuning seeds' standard error (std 1 over sqrt(3)).
    assert nested_mean_se([[1.0, 2.0, 3.0]]) == pytest.approx((2.0, 1 / math.sqrt(3)))
    baseline = [[1.0, 1.1, 0.9]]
    # Tight fine-tuning seeds within each pretraining, but pretrainings far apart: within noise, not better.
    spread = compare_nested([[5.0, 5.0, 5.0], [1.5, 1.5, 1.5]], baseline)
    assert spread["gap"] == pytest.approx(2.25) and spread["verdict"] == "within noise"
    steady = compare_nested([[3.0, 3.1, 2.9], [3.1, 3.0, 3.2], [2.9, 3.0, 3.0]], baseline)
    assert steady["verdict"] == "better" and steady["gap"] == pytest.approx(2.0222, abs=1e-4)
    # One pretraining seed: its spread is unknown, so no verdict beyond noise however large the gap.
    assert compare_nested([[9.0, 9.1, 8.9]], baseline)["verdict"] == "within noise"
    assert compare_nested([[9.0, 9.1, 8.9]], baseline, min_groups=1)["verdict"] == "better"
