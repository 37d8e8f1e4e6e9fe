"""Experiment workflow: recipes, W&B sweep commands, the Optuna sweeper and the submitit launchers."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

from mcl.results import collect_multirun

from .conftest import TINY, compose_train

ROOT = Path(__file__).parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
BIN = Path(sys.executable).parent


def sample_values(spec: dict) -> list:
    """Values a W&B parameter can take: its list, or the ends of its range."""
    if "values" in spec:
        return spec["values"]
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def agent_command(sweep: dict, params: dict) -> list[str]:
    """The command line ``wandb agent`` runs for ``params``: W&B's own macro expansion, as in its agent."""
    command = create_sweep_command(list(sweep["command"]))
    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros.update(env=["/usr/bin/env"], program=[sweep["program"]], interpreter=["python"])
    expanded = []
    for chunk in command:
        expanded += macros[chunk[2:-1]] if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return expanded


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_wandb_sweep_commands_compose_for_every_combination(path, tmp_path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "mcl-train" and sweep["metric"]["name"] == "val/knn_top1"
    names = list(sweep["parameters"])
    for values in itertools.product(*(sample_values(sweep["parameters"][n]) for n in names)):
        command = agent_command(sweep, dict(zip(names, values, strict=True)))
        assert command[:3] == ["/usr/bin/env", "mcl-train", "logger=wandb"]
        cfg = compose_train(command[2:], tmp_path)
        for name, value in zip(names, values, strict=True):
            assert OmegaConf.select(cfg, name) == value
        with torch.device("meta"):  # every check of the constructors, without the time random initialisation takes
            model = hydra.utils.instantiate(cfg.method, _convert_="all")  # levels, assignment, temperature
        assert model.loss.levels == cfg.levels
        assert model.levels == cfg.levels


def test_wandb_sweep_command_is_accepted_by_the_console_script(tmp_path):
    sweep = yaml.safe_load((ROOT / "sweeps" / "levels_x_assignment.yaml").read_text())
    command = agent_command(sweep, {"levels": 4, "loss.target_assignment": "all-levels"})
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "WANDB_MODE": "offline"}
    result = subprocess.run([*command, "--cfg", "job"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    job = yaml.safe_load(result.stdout)
    assert job["levels"] == 4 and job["loss"]["target_assignment"] == "all-levels"
    assert "WandbLogger" in job["logger"]["wandb"]["_target_"]


def test_slurm_launcher_takes_nodes_and_tasks_from_the_trainer():
    cfg = compose_train(
        with_hydra=True, overrides=["cluster=slurm", "trainer=multi_node", "trainer.num_nodes=2", "trainer.devices=4"]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.sync_batchnorm
    # A recipe keeps its own trainer: one node of 8 GPUs for the Swin-T recipe, 4 x 8 for the released R50 one.
    swin = compose_train(with_hydra=True, overrides=["experiment=mcl_swint_b1024_e100_imagenet", "cluster=slurm"])
    assert (swin.hydra.launcher.nodes, swin.hydra.launcher.tasks_per_node) == (1, 8)
    official = compose_train(
        with_hydra=True, overrides=["experiment=mcl_official_r50_b4096_e100_imagenet", "cluster=slurm"]
    )
    assert (official.hydra.launcher.nodes, official.hydra.launcher.tasks_per_node) == (4, 8)


def test_optuna_search_composes_its_space():
    cfg = compose_train(with_hydra=True, overrides=["search=fmnist_optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"levels", "loss.target_assignment", "loss.temperature", "optimizer.lr"}
    assert cfg.optimized_metric == "val/knn_top1"


def run_multirun(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    tiny = [o for o in TINY if o.split("=")[0] not in {"batch_size", "image_size"}]
    command = [str(BIN / "mcl-train"), "--multirun", *tiny, "batch_size=8", "image_size=32", "data.num_train=32",
               "data.num_val=16", "method.projector_hidden_dim=32", "validate_at_init=false",
               "callbacks.checkpoint=null", "+trainer.enable_checkpointing=false", f"hydra.sweep.dir={tmp_path}",
               *overrides]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_optuna_search_runs_trials_and_reports_the_best(tmp_path):
    run_multirun(tmp_path, "search=fmnist_optuna", "hydra.sweeper.n_trials=2", "levels=choice(1,2)")
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and set(best["best_params"]) >= {"levels", "loss.temperature"}
    table = collect_multirun(tmp_path)
    assert len(table) == 2 and table["status"].eq("finished").all()
    assert best["best_value"] == pytest.approx(table["val/knn_top1"].max())


@pytest.mark.slow
def test_submitit_local_launcher_runs_each_job(tmp_path):
    run_multirun(tmp_path, "cluster=local", "levels=1,2")
    table = collect_multirun(tmp_path)
    assert table["levels"].tolist() == [1, 2] and table["status"].eq("finished").all()
    assert any((tmp_path / ".submitit").iterdir())
