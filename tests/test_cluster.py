"""Runs whose world size cannot be reached stop before anything is built: several nodes without a launcher, or a
launcher that started another number of processes."""

import subprocess
import sys
from pathlib import Path

import pytest

from mcl.cluster import LAUNCHERS, check_world_size, detect_launcher
from mcl.train import train

from .conftest import compose_train

IMAGENET_RECIPES = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*imagenet.yaml"))
LAUNCHER_VARIABLES = {key for required, _ in LAUNCHERS.values() for key in required} | {"SLURM_JOB_NAME"}


@pytest.fixture
def no_launcher(monkeypatch):
    for key in LAUNCHER_VARIABLES:
        monkeypatch.delenv(key, raising=False)


def test_launchers_are_recognised_by_their_variables():
    assert detect_launcher({}) is None
    assert detect_launcher({"SLURM_NTASKS": "32", "SLURM_PROCID": "5"}) == ("SLURM (srun)", 32)
    # An interactive SLURM allocation (no srun) is no launcher, as in Lightning.
    assert detect_launcher({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "interactive"}) is None
    assert detect_launcher({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "16"}) == (
        "torchrun / torchelastic",
        16,
    )
    assert detect_launcher({"MASTER_ADDR": "node1", "NODE_RANK": "1"})[1] is None


def test_recipes_are_the_ones_expected():
    assert len(IMAGENET_RECIPES) == 5


@pytest.mark.parametrize("recipe", IMAGENET_RECIPES)
def test_imagenet_recipes_use_device_views(recipe):
    cfg = compose_train([f"experiment={recipe}", "data.train_dir=/x", "data.val_dir=/y"])
    assert cfg.data.augment_on == "device"


def test_multi_node_recipe_without_launcher_stops_before_anything_is_written(tmp_path, no_launcher):
    cfg = compose_train(
        ["experiment=mcl_official_r50_b4096_e100_imagenet", "data.train_dir=/nowhere", "data.val_dir=/nowhere"],
        output_dir=tmp_path,
    )
    with pytest.raises(ValueError) as error:
        train(cfg)
    message = str(error.value)
    assert "trainer.num_nodes=4" in message and "trainer.num_nodes=1" in message
    # The one-node run's global batch and scaled lr: 128 x 8 = 1024 instead of 4096, lr 1.0 x 1024/256.
    assert "global batch 1024" in message and "instead of 4096" in message
    assert "1024/256 = 4 instead of 16" in message
    assert "trainer.accumulate_grad_batches=4" in message
    assert list(tmp_path.iterdir()) == []


def test_cpu_run_asking_for_two_nodes_stops(no_launcher):
    cfg = compose_train(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2"])
    with pytest.raises(ValueError, match="trainer.num_nodes=2 asks for 2 nodes"):
        check_world_size(cfg)


def test_one_node_and_launched_runs_pass(no_launcher):
    recipe = ["experiment=mcl_paper_r50_b4096_e100_imagenet", "data.train_dir=/x", "data.val_dir=/y"]
    check_world_size(compose_train([*recipe, "trainer.num_nodes=1"]))
    cfg = compose_train(recipe)
    check_world_size(cfg, {"SLURM_NTASKS": "32", "SLURM_PROCID": "0"})
    check_world_size(cfg, {"MASTER_ADDR": "node0", "NODE_RANK": "2"})


def test_a_launcher_that_started_another_count_is_refused(no_launcher):
    cfg = compose_train(["experiment=mcl_paper_r50_b4096_e100_imagenet", "data.train_dir=/x", "data.val_dir=/y"])
    with pytest.raises(ValueError, match=r"asks for 32 processes, but SLURM \(srun\) started 8"):
        check_world_size(cfg, {"SLURM_NTASKS": "8", "SLURM_PROCID": "0"})


def test_the_console_script_refuses_before_torch_loads(tmp_path, no_launcher):
    """``mcl-train`` composes and checks the world size in mcl.launch, which imports neither torch nor Lightning, so
    the refusal costs a config composition, not the library's imports."""
    probe = "import sys, mcl.launch; print(sorted(m for m in ('torch', 'pytorch_lightning') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "[]\n"
    script = Path(sys.executable).parent / "mcl-train"
    overrides = ["experiment=mcl_official_r50_b4096_e100_imagenet", "data.train_dir=/x", "data.val_dir=/y"]
    result = subprocess.run([script, *overrides, f"hydra.run.dir={tmp_path}"], capture_output=True, text=True)
    assert result.returncode == 1 and "add trainer.num_nodes=1" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing of the run, not even its log file


@pytest.mark.parametrize("devices", ["-1", "auto", "'0,1,2,3,4,5,6,7'"])
def test_devices_the_node_decides_or_lists_are_not_refused(devices, no_launcher):
    recipe = ["experiment=mcl_paper_r50_b4096_e100_imagenet", "data.train_dir=/x", "data.val_dir=/y"]
    cfg = compose_train([*recipe, f"trainer.devices={devices}"])
    check_world_size(cfg, {"SLURM_NTASKS": "32", "SLURM_PROCID": "0"})
