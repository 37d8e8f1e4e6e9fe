"""``benchmarks/data.py --quick``: every measurement of the data benchmark runs (the end-to-end path too, on the
CPU) and lands in the JSON and the markdown page."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MODULE = "benchmarks.data"
LEVELS = ("levels_1", "levels_2", "levels_3", "levels_4")


def test_quick_data_benchmark_measures_every_pipeline(tmp_path):
    output = tmp_path / "data_quick.json"
    command = [sys.executable, "-m", MODULE, "--quick", "--device", "cpu", "--workers", "1", "--output", str(output)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600, cwd=ROOT)
    results = json.loads(output.read_text())
    assert results["environment"]["device"].startswith("cpu") and results["environment"]["workers"] == 1
    cpu, device = results["cpu_worker"], results["device_pipeline"]
    assert set(cpu) == {"decode", "decode_shrink", *LEVELS} and set(device) == set(LEVELS)
    assert all(rate > 0 for rate in (*cpu.values(), *device.values()))
    # More levels mean more views per source image: the CPU pipeline's rate falls from 1 to 4 levels.
    assert cpu["levels_4"] < cpu["levels_1"]
    model = results["model_step"]
    assert model["backbone"] == "resnet18" and model["gflop_per_step"] > 0 and model["mfu"] is None
    assert model["cores_cpu_views"] == pytest.approx(model["images_per_s"] / cpu["levels_3"])
    e2e = results["end_to_end"]
    assert e2e["images_per_s"] > 0 and e2e["share_of_model_step"] == pytest.approx(
        e2e["images_per_s"] / model["images_per_s"]
    )
    page = output.with_suffix(".md").read_text()
    assert "python -m benchmarks.data --quick" in page and "| CPU views, one worker (1 thread) |" in page
    assert "of the model step alone" in page
