"""mcl.runtime: what every entry point shares (folder names, W&B mode, the config folder, the summary)."""

from pathlib import Path

import pytest

from mcl.runtime import CONFIG_DIR, ensure_wandb_mode, print_summary, short_dirname, wandb_has_key


def test_long_override_lists_get_short_unique_folder_names():
    assert short_dirname("levels=2,seed=1") == "levels=2,seed=1"
    assert short_dirname("data.root=/a/b") == "data.root=_a_b"  # no sub-folders from paths in values
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    assert len(short_dirname(long_a)) == 120 and short_dirname(long_a) != short_dirname(long_b)
    assert short_dirname(long_a)[:111] == "x" * 111 and short_dirname(long_a) == short_dirname(long_a)


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "unset")  # recorded, so that what ensure_wandb_mode sets is undone afterwards
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    return tmp_path


def test_wandb_runs_offline_without_a_key_and_keeps_a_chosen_mode(no_wandb_key, monkeypatch):
    assert not wandb_has_key()
    assert ensure_wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert ensure_wandb_mode() == "disabled"


def test_a_stored_or_exported_key_counts(no_wandb_key, monkeypatch):
    netrc = no_wandb_key / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    netrc.chmod(0o600)
    assert wandb_has_key() and ensure_wandb_mode() == "online"
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "abc")
    assert wandb_has_key()


def test_the_config_folder_holds_every_entry_point():
    assert {"train.yaml", "linear.yaml", "finetune.yaml"} <= {p.name for p in Path(CONFIG_DIR).glob("*.yaml")}


def test_the_summary_is_titled_with_what_ran(capsys):
    print_summary({"val/knn_top1": 65.5, "train/loss": 13.6, "other": 1.0}, ("val/knn_top1", "val/acc"), "mcl: MCL")
    printed = capsys.readouterr().out
    assert "mcl: MCL" in printed and "kNN top-1 pretrained (%)" in printed and "65.50" in printed
    assert "val/acc" not in printed and "13.60" not in printed
