"""``benchmarks/detector_step.py``: every detector variant is timed and lands in the table with its ratio."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MODULE = "benchmarks.detector_step"


def test_detector_step_benchmark_times_every_variant(tmp_path):
    output = tmp_path / "detector_step.md"
    command = [sys.executable, "-m", MODULE, "--canvas", "64", "--batch-size", "1", "--repeats", "1", "--warmup", "0"]
    command += ["--output", str(output)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600, cwd=ROOT)
    page = output.read_text()
    rows = re.findall(r"^\| (\w+_\w+, [^|]+) \| ([\d.]+) \| ([\d.]+)x \| ([\d.]+) \| ([\d.]+)x \|$", page, re.M)
    assert [row[0].split(",")[0] for row in rows] == ["fasterrcnn_v2", *["fasterrcnn_c4"] * 3, *["maskrcnn_c4"] * 2]
    assert rows[0][2] == "1.0" and all(float(row[1]) > 0 and float(row[3]) > 0 for row in rows)
    assert "`python -m benchmarks.detector_step --canvas 64 --batch-size 1 --repeats 1 --warmup 0 --output" in page
    assert "batch 1 of 64 px canvases" in page
