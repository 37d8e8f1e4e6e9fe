"""``benchmarks/transfer.py --quick``: the whole transfer protocol end to end, on a handful of images."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "transfer.py"


def test_quick_transfer_benchmark_writes_the_table_and_resumes_from_its_cache(tmp_path):
    command = [sys.executable, str(SCRIPT), "--quick", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    summary = json.loads((tmp_path / "transfer_quick.json").read_text())
    assert list(summary["rows"]) == ["random init", "supervised", "MCL, 3 levels"]
    for row in summary["rows"].values():
        (pretraining,) = row["pretrainings"]
        assert pretraining["lr"] in (0.02, 0.05) and set(pretraining["heldout_ap_by_lr"]) == {"0.02", "0.05"}
        assert len(pretraining["runs"]) == 2 and 0 <= pretraining["knn_top1"] <= 100
        places = ("in_place", "centred", "moved")
        assert all(0 <= pretraining[f"objects_{place}_top1"] <= 100 for place in places)
        assert all(0 <= run["val/APm3"] <= 100 and len(run["ap_by_iou"]) == 10 for run in pretraining["runs"])
    table = (tmp_path / "transfer_quick.md").read_text()
    assert "| supervised |" in table and " ± " in table and "vs random init" in table and "objects moved" in table
    assert (tmp_path / "transfer_ap_by_iou_quick.png").stat().st_size > 10_000
    # A second run finds every result in its cache: no training, same numbers.
    rerun = subprocess.run(command, check=True, capture_output=True, text=True)
    assert "Trainer.fit" not in rerun.stdout + rerun.stderr
    assert json.loads((tmp_path / "transfer_quick.json").read_text())["rows"] == summary["rows"]
