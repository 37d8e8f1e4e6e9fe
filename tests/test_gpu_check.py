"""``benchmarks/gpu_check.py --quick``: every part of the GPU acceptance check runs on the CPU at tiny sizes and lands
in the JSON with real figures, and the markdown page names what was not measured."""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MODULE = "benchmarks.gpu_check"
PARTS = ["environment", "device_views", "host_syncs", "bare_step", "precision", "lightning_run", "two_process"]
SYNC_RUNS = ["mcl_augment_on_cpu", "mcl_augment_on_device", "supervised_augment_on_cpu", "supervised_augment_on_device"]


def positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", MODULE, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run on the CPU: its exit status, JSON and markdown page."""
    folder = tmp_path_factory.mktemp("gpu_check")
    result = run("--quick", "--device", "cpu", "--output", str(folder))
    if not (folder / "gpu_check_quick.json").is_file():
        pytest.fail(f"no results were written:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    results = json.loads((folder / "gpu_check_quick.json").read_text())
    return result, results, (folder / "gpu_check_quick.md").read_text()


def test_every_part_runs_and_passes(quick):
    result, results, _ = quick
    failures = {name: part["error"] for name, part in results["parts"].items() if part["status"] != "ok"}
    assert failures == {}
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(results["parts"]) == PARTS and results["failed"] == [] and results["quick"] is True
    assert all(positive(part["seconds"]) for part in results["parts"].values())


def test_environment_reports_the_machine_and_the_trainers_cudnn_setting(quick):
    env = quick[1]["parts"]["environment"]
    assert env["card"].startswith("cpu") and env["torch"] and env["trainer_config"] == "cpu"
    assert isinstance(env["cudnn_benchmark"], bool)
    assert env["peak_bf16_tflops"] is None and "peak_bf16_tflops" in env["not_measured"]


def test_device_views_and_their_share_of_a_step(quick):
    views = quick[1]["parts"]["device_views"]
    assert positive(views["ms_per_batch"]) and positive(views["source_images_per_s"])
    assert views["views"] == "(8, 2, 3, 3, 32, 32)"
    assert 0 < views["share_of_training_step"] < 1


def test_host_syncs_are_counted_for_both_methods_and_view_paths(quick):
    syncs = quick[1]["parts"]["host_syncs"]
    for name in SYNC_RUNS:
        run_figures = syncs[name]
        each = run_figures["host_syncs_each_step"]
        assert run_figures["steps_counted"] == len(each) == 2
        assert all(isinstance(count, int) and count >= 0 for count in each)
        assert sum(run_figures["by_op"].values()) == pytest.approx(sum(each) / len(each))
        assert positive(run_figures["aten_ops_per_step"])
        # CUDA-only figures are absent on the CPU, and said to be.
        assert run_figures["kernel_launches_per_step"] is None and run_figures["cuda_sync_warnings_per_step"] is None
    assert any("kernel_launches" in key for key in syncs["not_measured"])


def test_bare_step_variants_have_rates(quick):
    step, batch = quick[1]["parts"]["bare_step"], quick[1]["plan"]["batch"]
    assert positive(step["gflop_per_step"])
    for variant in ("default", "channels_last", "compile"):
        row = step[variant]
        assert positive(row["ms_per_step"]) and positive(row["images_per_s"]) and positive(row["first_step_s"])
        assert row["images_per_s"] == pytest.approx(1000 * batch / row["ms_per_step"])
        assert row["mfu_percent"] is None and row["peak_memory_mib"] is None  # no CUDA card
    assert step["compile"]["compile_backend"] == "eager" and step["compile"]["graphs"] > 0


def test_precision_losses_agree_and_the_ema_is_exact(quick):
    precision = quick[1]["parts"]["precision"]
    assert math.isfinite(precision["loss_fp32"]) and math.isfinite(precision["loss_bf16"])
    assert precision["loss_relative_difference"] < 0.05
    assert precision["ema_online_target_max_gap"] > 0  # the update had something to move
    assert precision["ema_max_error_fp32_eps"] <= 2 and precision["ema_max_abs_error"] < 1e-6
    assert all(precision["checks"].values())


def test_lightning_run_times_steps_and_resumes_from_its_step(quick):
    run_figures = quick[1]["parts"]["lightning_run"]
    plan = quick[1]["plan"]
    assert run_figures["steps"] == plan["run_steps"]
    assert positive(run_figures["steady_ms_per_step"]) and math.isfinite(run_figures["overhead_vs_bare_step"])
    assert 0 <= run_figures["knn_top1"] <= 100 and math.isfinite(run_figures["train_loss"])
    assert run_figures["resume_first_step"] == plan["run_steps"]
    total = plan["run_steps"] + plan["resume_steps"]
    assert run_figures["resume_last_step"] == run_figures["resume_checkpoint_step"] == total


def test_two_processes_finish_with_identical_parameters(quick):
    ranks = quick[1]["parts"]["two_process"]
    assert ranks["checks"]["finished_within_timeout"] and ranks["checks"]["identical_parameters"]
    assert ranks["parameter_max_abs_difference"] == 0
    assert len(ranks["losses_rank0"]) == len(ranks["losses_rank1"]) == quick[1]["plan"]["ddp_steps"]
    assert all(math.isfinite(loss) for loss in ranks["losses_rank0"] + ranks["losses_rank1"])


def test_the_page_names_the_command_and_what_was_not_measured(quick):
    page = quick[2]
    assert "`python -m benchmarks.gpu_check --quick --device cpu --output" in page
    assert "no figure here is a GPU figure" in page
    assert "| bare_step | default.ms_per_step |" in page
    assert "- bare_step.*.peak_memory_mib: CUDA only" in page


@pytest.fixture(scope="module")
def gpu_check():
    """The benchmark imported in this process (its functions, without a new interpreter's start-up)."""
    return importlib.import_module(MODULE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_full_sizes_without_cuda_are_refused(gpu_check, capsys):
    with pytest.raises(SystemExit) as refused:
        gpu_check.parse_args(["--parts", "environment"])
    assert refused.value.code == 2
    assert "no CUDA device: run with --quick on the CPU" in capsys.readouterr().err


def test_peak_table_matches_the_names_cuda_reports(gpu_check):
    names = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S"]
    names += ["NVIDIA H100 NVL", "Tesla T4"]
    peaks = [gpu_check.peak_bf16(name)[0] for name in names]
    assert peaks == [989e12, 756e12, 989e12, 312e12, 362e12, None, None]
