"""Multirun job folder names (mcl.configs.job_dirname, SweptKeysFirst): the keys a sweep varies come first."""

import subprocess
import sys
import textwrap

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mcl.configs import CONFIG_DIR, FIXED_KEYS_VARIABLE, SweptKeysFirst, fixed_keys, job_dirname, short_dirname

SETTINGS = {"exclude_keys": ["trainer", "data.root"], "kv_sep": "=", "item_sep": ","}
FIXED = [f"option{i:02d}=value{i:02d}" for i in range(20)]  # many fixed overrides: a name far over 120 characters


def test_fixed_keys_are_those_the_command_line_sets_to_one_value():
    sweep = ["levels=1,2,3", "+trainer.max_steps=5", "loss.level_weights=[0.5,0.5]", "seed=choice(1,2)",
             "optimizer.lr=tag(log, interval(0.2, 2.0))", "search=fmnist_optuna", "data.root='/a,b'"]  # fmt: skip
    assert fixed_keys(sweep) == ["data.root", "loss.level_weights", "search", "trainer.max_steps"]


def test_swept_keys_come_first_and_survive_the_cut():
    jobs = [[*FIXED, f"zeta={value}"] for value in (1, 2)]
    names = [job_dirname(job, SETTINGS, ",".join(fixed_keys([*FIXED, "zeta=1,2"]))) for job in jobs]
    assert [name.split(",")[0] for name in names] == ["zeta=1", "zeta=2"]
    assert names[0].split(",")[1] == "option00=value00" and all(len(name) == 120 for name in names)
    assert names[0] != names[1] and names[0][-9] == "-"  # cut and hashed as before
    assert names[0] == job_dirname(jobs[0], SETTINGS, ",".join(fixed_keys([*FIXED, "zeta=1,2"])))  # deterministic


def test_without_the_fixed_keys_the_name_is_hydras_override_dirname():
    job = ["seed=2", "levels=3", "trainer=gpu", "data.root=/data/x", "+trainer.max_steps=5", "a=/b"]
    hydra_order = "+trainer.max_steps=5,a=_b,levels=3,seed=2"  # sorted input lines, excluded keys left out
    assert job_dirname(job, SETTINGS, None) == hydra_order
    assert job_dirname(job, SETTINGS, "") == hydra_order  # nothing fixed: everything swept, alphabetically
    assert job_dirname(job, SETTINGS, "levels,trainer.max_steps") == "a=_b,seed=2,+trainer.max_steps=5,levels=3"
    assert job_dirname(job, {**SETTINGS, "kv_sep": ":", "item_sep": "__"}, "levels") == (
        "+trainer.max_steps:5__a:_b__seed:2__levels:3"
    )
    assert job_dirname("levels=2,seed=1") == short_dirname("levels=2,seed=1")  # the resolver's old one-string form


def job_folder(sweep: list[str], job: list[str], num: int = 0) -> str:
    """What Hydra does for one job of a multirun of ``sweep``: the callback sees the sweep's config, then the job's
    config is composed from the sweep's Hydra overrides and the job's own overrides, and its folder resolved."""
    sweep_config = OmegaConf.create({"hydra": {"overrides": {"task": sweep, "hydra": ["hydra.mode=MULTIRUN"]}}})
    SweptKeysFirst().on_multirun_start(config=sweep_config)
    (added,) = sweep_config.hydra.overrides.hydra[1:]
    assert added.startswith(f"++hydra.job.env_set.{FIXED_KEYS_VARIABLE}=")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", [*sweep_config.hydra.overrides.hydra, *job], return_hydra_config=True)
    cfg.hydra.job.num = num
    return cfg.hydra.sweep.subdir


def test_basic_sweep_job_folder_starts_with_the_swept_key():
    fixed = ["trainer.max_epochs=1", "optimizer.lr=0.5", "batch_size=8", "image_size=32", "validate_at_init=false",
             "method.projector_hidden_dim=32", "neck.out_channels=16", "data.root=/data/fmnist"]  # fmt: skip
    name = job_folder(["seed=1,2", *fixed], ["seed=2", *fixed], num=1)
    assert name.startswith("1_seed=2,batch_size=8,image_size=32,method.projector_hidden_dim=32,")
    assert "data.root" not in name and len(name) == len("1_") + 120


def test_optuna_trial_folder_starts_with_the_searched_keys():
    """The Optuna sweeper gives a trial its sampled values, then the fixed overrides; ``levels=3`` on the command
    line fixes a key of the search space, so it is not among the swept ones."""
    sweep = ["search=fmnist_optuna", "levels=3", "seed=choice(1,2)"]
    trial = ["loss.target_assignment=top", "loss.temperature=0.35", "optimizer.lr=0.53", "seed=2",
             "search=fmnist_optuna", "levels=3"]  # fmt: skip
    assert job_folder(sweep, trial) == (
        "0_loss.target_assignment=top,loss.temperature=0.35,optimizer.lr=0.53,seed=2,levels=3,search=fmnist_optuna"
    )


def test_hydra_multirun_names_the_job_folders_swept_key_first(tmp_path):
    """A real ``--multirun`` through Hydra's basic sweeper and launcher, with a task that does nothing."""
    app = tmp_path / "app.py"
    app.write_text(
        textwrap.dedent(f"""
            import hydra

            @hydra.main(version_base="1.3", config_path={CONFIG_DIR!r}, config_name="train")
            def main(cfg):
                return None

            main()
        """)
    )
    sweep = tmp_path / "sweep"
    command = [sys.executable, str(app), "--multirun", "seed=1,2", "batch_size=8", "optimizer.lr=0.5",
               "data.root=/data", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [
        "0_seed=1,batch_size=8,optimizer.lr=0.5",
        "1_seed=2,batch_size=8,optimizer.lr=0.5",
    ]
