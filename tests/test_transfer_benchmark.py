"""``benchmarks/transfer.py --quick``: the whole transfer protocol end to end, on a handful of images."""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "transfer.py"


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """The run cache the quick benchmarks share: the segmentation one reuses the detection one's pretrainings."""
    return tmp_path_factory.mktemp("runs")


def test_quick_transfer_benchmark_writes_the_tables_and_resumes_from_its_cache(tmp_path, quick_runs, monkeypatch):
    """Two runs at a time (``--jobs 2``, each in its own process); two pretraining seeds, one fine-tuning seed
    each, the lr chosen once per row on the first pretraining; random init gets as many seeds in one group."""
    arguments = ["--quick", "--jobs", "2", "--runs", str(quick_runs), "--results", str(tmp_path)]
    subprocess.run([sys.executable, str(SCRIPT), *arguments], check=True, capture_output=True, text=True)
    summary = json.loads((tmp_path / "transfer_quick.json").read_text())
    assert list(summary["rows"]) == ["random init", "MCL, 3 levels"]
    baseline, mcl = summary["rows"]["random init"]["pretrainings"], summary["rows"]["MCL, 3 levels"]["pretrainings"]
    assert [p["seed"] for p in mcl] == [0, 1] and [len(p["runs"]) for p in mcl] == [1, 1]
    assert [p["seed"] for p in baseline] == [0] and len(baseline[0]["runs"]) == 2
    for pretrainings in (baseline, mcl):
        first = pretrainings[0]
        assert first["lr"] in (0.02, 0.05) and set(first["heldout_ap_by_lr"]) == {"0.02", "0.05"}
        assert all(p["lr"] == first["lr"] and p["heldout_ap_by_lr"] == {} for p in pretrainings[1:])
        for pretraining in pretrainings:
            assert 0 <= pretraining["knn_top1"] <= 100
            assert all(0 <= pretraining[f"objects_{place}_top1"] <= 100 for place in ("in_place", "centred", "moved"))
            assert all(0 <= run["val/APm3"] <= 100 and len(run["ap_by_iou"]) == 10 for run in pretraining["runs"])
    # Two distinct pretrainings, each with its own checkpoint, probed and fine-tuned from it.
    runs = sorted(path.name.rsplit("_", 1)[0] for path in quick_runs.iterdir())
    assert runs.count("pretrain_MCL_3_levels_seed0") == 1 and runs.count("pretrain_MCL_3_levels_seed1") == 1
    assert mcl[0]["knn_top1"] != mcl[1]["knn_top1"] or mcl[0]["linear_top1"] != mcl[1]["linear_top1"]
    table = (tmp_path / "transfer_quick.md").read_text()
    assert "| MCL, 3 levels |" in table and " ± " in table and "vs random init" in table and "objects moved" in table
    assert "Each pretraining seed" in table and "| MCL, 3 levels | 1 |" in table
    claims = (tmp_path / "claims_quick.md").read_text()
    assert "| b | MCL beats random initialisation | MCL, 3 levels vs random init |" in claims
    assert "rows ['MCL, 1 level'] not run" in claims and "| f |" in claims
    assert (tmp_path / "transfer_ap_by_iou_quick.png").stat().st_size > 10_000

    # A second run finds every result in its cache: no training, same numbers. It runs in this process, one run at
    # a time, so that any training would reach the patched Trainer.fit.
    def no_training(*args, **kwargs):
        raise AssertionError("the rerun trained instead of reading its cache")

    monkeypatch.setattr(pl.Trainer, "fit", no_training)
    importlib.import_module("benchmarks.transfer").main([*arguments, "--jobs", "1"])
    assert json.loads((tmp_path / "transfer_quick.json").read_text())["rows"] == summary["rows"]


def test_quick_semantic_transfer_fine_tunes_a_segmenter_from_the_cached_pretrainings(tmp_path, quick_runs):
    """``--task semantic``: the same rows and pretraining seeds (their cached pretrainings and probes reused), a
    semantic-FPN segmenter fine-tuned per seed, mIoU per row with its gap to random init, IoU per class."""
    pretrainings = sorted(path.name for path in quick_runs.glob("pretrain_*"))
    arguments = ["--quick", "--task", "semantic", "--lrs", "0.02", "--jobs", "1", "--runs", str(quick_runs)]
    importlib.import_module("benchmarks.transfer").main([*arguments, "--results", str(tmp_path)])  # in this process
    assert sorted(path.name for path in quick_runs.glob("pretrain_*")) == pretrainings  # nothing pretrained anew
    summary = json.loads((tmp_path / "transfer_quick_semantic.json").read_text())
    assert summary["settings"]["task"] == "semantic" and summary["settings"]["arch"] == "semantic_fpn"
    baseline, mcl = summary["rows"]["random init"]["pretrainings"], summary["rows"]["MCL, 3 levels"]["pretrainings"]
    assert [len(p["runs"]) for p in mcl] == [1, 1] and len(baseline[0]["runs"]) == 2
    for run in [run for p in baseline + mcl for run in p["runs"]]:
        assert 0 <= run["val/mIoU"] <= 100 and 0 <= run["val/pixel_accuracy"] <= 100
        assert set(run["weights"]) == {"stem", "res2", "res3", "res4", "res5", "fpn", "head"}
        assert run["weights"]["res5"]["relative_move"] == 0 and run["weights"]["head"]["relative_move"] > 0
    finetunings = [path.name for path in quick_runs.glob("finetune_semantic_fpn_*")]
    assert len(finetunings) == 4  # no grid with one lr: 2 random-init seeds, 1 per MCL pretraining
    table = (tmp_path / "transfer_quick_semantic.md").read_text()
    assert (
        "semantic FPN R18 (segmentation)" in table and "| lr | mIoU | mIoU per pretraining | pixel accuracy |" in table
    )
    assert "By class: IoU" in table and "| pretraining | background | T_shirt_top | Trouser |" in table
    assert not (tmp_path / "claims_quick_semantic.md").exists()


def test_quick_c4_transfer_fine_tunes_mask_rcnn_c4_from_the_interp_neck(tmp_path, quick_runs):
    """``--arch maskrcnn_c4``: the C4 detector for every row, res5 trained (``--frozen-stages 4`` by default), box and
    mask AP per row; the interp pretraining row reads C4 at the benchmark's 32 px. The canvases and the random-init
    probes come from the shared cache."""
    command = [
        sys.executable, str(SCRIPT), "--quick", "--arch", "maskrcnn_c4", "--rows", "MCL, 3 levels, interp C4",
        "--lrs", "0.02", "--seeds", "1", "--pretrain-seeds", "1", "--runs", str(quick_runs),
        "--results", str(tmp_path), "--tag", "c4",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    summary = json.loads((tmp_path / "transfer_c4.json").read_text())
    assert list(summary["rows"]) == ["random init", "MCL, 3 levels, interp C4"]
    assert summary["settings"]["arch"] == "maskrcnn_c4" and summary["settings"]["frozen_stages"] == 4
    for row in summary["rows"].values():
        (run,) = row["pretrainings"][0]["runs"]
        assert 0 <= run["val/AP"] <= 100 and 0 <= run["val/mask_AP"] <= 100
        # res4 frozen as loaded, res5 (the box head) trained; no FPN in a C4 detector.
        assert run["weights"]["res4"]["relative_move"] == 0 and run["weights"]["box_head"]["relative_move"] > 0
        assert "fpn" not in run["weights"] and "res5" not in run["weights"]
    runs = sorted(path.name for path in quick_runs.iterdir() if path.name.startswith("finetune_maskrcnn_c4_"))
    assert len(runs) == 2
    table = (tmp_path / "transfer_c4.md").read_text()
    assert "Mask R-CNN R18-C4" in table and "| mask AP | mask vs random init |" in table
    assert "res5 (the RoI head, starting from the loaded res5), RPN and predictors trained" in table


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--arch", "fasterrcnn_c4", "--roi-levels", "pretraining"], "is for the FPN detectors"),
        (["--rows", "MCL, 3 levels, interp C5"], r"need views of at least \[64\] px, these settings pretrain at 32"),
        (["--task", "semantic", "--arch", "maskrcnn_v2"], "--task semantic fine-tunes a semantic-FPN segmenter"),
    ],
)
def test_settings_a_c4_run_cannot_use_are_refused_before_any_work(tmp_path, arguments, message, capsys):
    transfer = importlib.import_module("benchmarks.transfer")
    with pytest.raises(SystemExit) as refused:
        transfer.main(["--quick", "--runs", str(tmp_path / "runs"), *arguments])
    assert refused.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()
