"""Gather the results of many runs into one table: a Hydra multirun folder, or a W&B project when online.

``mcl-collect multirun/mcl/2026-11-26_16-00-00`` prints one row per job: the job's command-line overrides as
columns, then its metrics. Jobs that did not finish keep their row with the last values their CSV log holds, so a
crashed job in a sweep is seen rather than silently dropped. In Python, :func:`collect_multirun` returns the same
table as a :class:`pandas.DataFrame`.

A job's ``status`` (:func:`job_status`) comes from its ``run.json`` (written by ``mcl-train``) and its lock file
``.mcl-run.lock``:

- ``finished``: ``run.json`` says so; for a folder without ``run.json`` (``mcl-linear``, ``mcl-finetune``, runs older
  than ``run.json``), ``metrics.json`` is there.
- ``failed``: the run stopped on an error.
- ``interrupted``: the run was stopped (SIGTERM, SIGINT) after saving its checkpoint, from which it can resume.
- ``running``: ``run.json`` says ``running`` (or is not written yet while a lock is there) and the process named by
  the lock is alive; a lock taken on another host cannot be checked from here and counts as alive.
- ``dead``: ``run.json`` says ``running`` but no process holds the folder: no lock, or the lock of a process that no
  longer exists on this host (killed, out of memory, machine restarted).
- ``unfinished``: a folder without ``run.json``, ``metrics.json`` or a lock (an ``mcl-linear`` or ``mcl-finetune``
  job: they keep neither ``run.json`` nor a lock, so whether such a job still runs cannot be told).

``run.json`` is read first: a finished run that is rerun and fails its checks keeps ``run.json`` as it was, and stays
``finished``.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from mcl.runs import LOCK_FILE, STATE_FILE, process_alive, read_json
from mcl.runtime import METRICS_FILE, wandb_has_key

DEFAULT_METRICS = ("init/knn_top1", "val/knn_top1", "val/acc", "val/top1", "val/AP", "train/loss")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value) of repeated measurements."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def compare_means(values: Sequence[float], baseline: Sequence[float]) -> dict[str, float | str]:
    """Gap between the means of two sets of seeds and twice its standard error, with a verdict.

    ``two_se`` is ``2 * sqrt(s1²/n1 + s0²/n0)``; the verdict is ``better`` or ``worse`` only when the gap exceeds
    it, else ``within noise``. With one value on either side there is no spread to measure: always ``within noise``.
    """
    (m1, s1), (m0, s0) = mean_std(values), mean_std(baseline)
    two_se = 2 * math.sqrt(s1**2 / len(values) + s0**2 / len(baseline))
    if len(values) < 2 or len(baseline) < 2:
        verdict = "within noise"
    else:
        verdict = "better" if m1 - m0 > two_se else "worse" if m0 - m1 > two_se else "within noise"
    return {"gap": m1 - m0, "two_se": two_se, "verdict": verdict}


def nested_mean_se(groups: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Mean and standard error of a two-level measurement: ``groups`` holds, per pretraining seed, the values of its
    fine-tuning seeds.

    The mean is the mean of the per-group means (each pretraining counts once, whatever its fine-tuning seeds). With
    two groups or more, the standard error is the sample standard deviation of the group means over ``sqrt(groups)``:
    it holds both the pretraining-seed spread and the fine-tuning noise inside each group mean. With one group (no
    pretraining to repeat, as random initialisation, or a single pretraining seed) it is the fine-tuning seeds'
    standard error, which leaves the pretraining spread out.
    """
    groups = [list(group) for group in groups if len(group)]
    if not groups:
        raise ValueError("nested_mean_se needs at least one group with a value")
    means = [mean_std(group)[0] for group in groups]
    if len(groups) == 1:
        mean, std = mean_std(groups[0])
        return mean, std / math.sqrt(len(groups[0]))
    mean, std = mean_std(means)
    return mean, std / math.sqrt(len(means))


def compare_nested(
    groups: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]], min_groups: int = 2
) -> dict[str, float | str]:
    """:func:`compare_means` for two-level measurements (:func:`nested_mean_se`): the gap of the means, twice the
    combined standard error, and a verdict, ``better`` or ``worse`` only beyond it. A side whose spread cannot be
    measured (one value in all) is always ``within noise``; so is a row with fewer than ``min_groups`` pretraining
    seeds (the baseline, random initialisation, has none to repeat and is exempt): its spread leaves out the
    pretraining's."""
    (m1, se1), (m0, se0) = nested_mean_se(groups), nested_mean_se(baseline)
    two_se = 2 * math.sqrt(se1**2 + se0**2)
    sizes = [sum(len(g) for g in groups), sum(len(g) for g in baseline)]
    if min(sizes) < 2 or len([g for g in groups if len(g)]) < min_groups:
        verdict = "within noise"
    else:
        verdict = "better" if m1 - m0 > two_se else "worse" if m0 - m1 > two_se else "within noise"
    return {"gap": m1 - m0, "two_se": two_se, "verdict": verdict}


def parse_value(text: str) -> Any:
    """A command-line value as Hydra reads it: int, float (``1e-3`` too), ``true``/``false``, ``null``, else text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return None if lowered == "null" else text


def parse_override(override: str) -> tuple[str, Any]:
    """``"loss.temperature=0.2"`` -> ``("loss.temperature", 0.2)``, ``"levels=2"`` -> ``("levels", 2)``."""
    key, sep, value = override.partition("=")
    return key.lstrip("+~"), parse_value(value) if sep else True


def lookup(config: dict[str, Any], key: str) -> Any:
    """``config["loss"]["temperature"]`` for ``"loss.temperature"`` (or a flat ``"loss.temperature"`` key, as W&B
    sweeps set it); ``None`` when a part is missing."""
    if key in config:
        return config[key]
    value: Any = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def resolved(config: DictConfig, key: str) -> Any:
    """``key`` of a job's saved config with its interpolations resolved (``method.levels`` -> ``3``, not
    ``${levels}``); the raw value when it needs Hydra's runtime (``${hydra:...}``)."""
    try:
        value = OmegaConf.select(config, key)
    except Exception:  # an interpolation that only resolves inside the Hydra run
        value = lookup(OmegaConf.to_container(config, resolve=False), key)
    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def last_logged(job_dir: Path) -> dict[str, float]:
    """The last value of every metric in the job's CSV logs (``csv/version_*/metrics.csv``), for a job that did not
    finish."""
    values: dict[str, float] = {}

    def version(path: Path) -> tuple[int, str]:  # version_10 after version_9
        digits = path.parent.name.rpartition("_")[2]
        return (int(digits) if digits.isdigit() else -1, str(path))

    for path in sorted(job_dir.glob("**/metrics.csv"), key=version):
        frame = pd.read_csv(path)
        for column in frame.columns.drop(["epoch", "step"], errors="ignore"):
            logged = frame[column].dropna()
            if len(logged):
                values[column] = float(logged.iloc[-1])
    return values


def lock_holder_alive(job_dir: Path) -> bool:
    """Whether a process holds the job folder: its ``.mcl-run.lock`` exists and names a live process, or one on
    another host (which cannot be checked from here), or cannot be read yet (a lock being written)."""
    lock_path = job_dir / LOCK_FILE
    if not lock_path.is_file():
        return False
    owner = read_json(lock_path)
    pid = owner.get("pid")
    if not owner or owner.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True
    return process_alive(pid)


def job_status(job_dir: Path) -> str:
    """``finished``, ``failed``, ``interrupted``, ``running``, ``dead`` or ``unfinished`` (see the module docstring)."""
    status = read_json(job_dir / STATE_FILE).get("status")
    if status in ("finished", "failed", "interrupted"):
        return status
    if status == "running":
        return "running" if lock_holder_alive(job_dir) else "dead"
    if (job_dir / METRICS_FILE).is_file():
        return "finished"
    if (job_dir / LOCK_FILE).is_file():  # a run that holds the folder but has not written run.json yet
        return "running" if lock_holder_alive(job_dir) else "dead"
    return "unfinished"


def read_job(job_dir: Path, config_keys: Sequence[str] = ()) -> dict[str, Any]:
    """One job folder (holding ``.hydra/``) -> ``{"job", "status", <override keys>, <config keys>, <metrics>}``: the
    metrics of ``metrics.json`` for a finished job, else the last values its CSV log holds."""
    row: dict[str, Any] = {"job": job_dir.name}
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    row.update(parse_override(o) for o in overrides)
    config_path = job_dir / ".hydra" / "config.yaml"
    if config_keys and config_path.is_file():
        config = OmegaConf.load(config_path)
        for key in config_keys:
            row.setdefault(key, resolved(config, key))
    row["status"] = job_status(job_dir)
    metrics_path = job_dir / METRICS_FILE
    if row["status"] == "finished" and metrics_path.is_file():
        row.update(json.loads(metrics_path.read_text()))
    else:
        row.update(last_logged(job_dir))
    return row


def job_dirs(root: str | Path) -> list[Path]:
    """Every run folder under ``root`` (a multirun folder, a parent of several, or one run), in job order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no results folder at {root}: pass a multirun folder such as multirun/mcl/<date>")
    found = [path.parent.parent for path in root.glob("**/.hydra/overrides.yaml")]
    if not found:
        raise FileNotFoundError(f"{root} holds no Hydra run (no .hydra/overrides.yaml below it)")

    def order(path: Path) -> tuple:
        head = path.name.split("_", 1)[0]
        return (str(path.parent), int(head) if head.isdigit() else -1, path.name)

    return sorted(found, key=order)


def to_frame(rows: Iterable[dict[str, Any]], metrics: Sequence[str] | None) -> pd.DataFrame:
    """Columns: identity and overrides first, then ``metrics`` (all metrics when ``None``) that any row has."""
    frame = pd.DataFrame(list(rows))
    first = [c for c in ("job", "group", "status") if c in frame.columns]
    metric_like = [c for c in frame.columns if "/" in c]
    settings = [c for c in frame.columns if c not in first and c not in metric_like]
    shown = metric_like if metrics is None else [m for m in metrics if m in frame.columns]
    return frame[first + settings + shown]


def collect_multirun(
    root: str | Path,
    metrics: Sequence[str] | None = DEFAULT_METRICS,
    config_keys: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per job of a Hydra multirun folder: its overrides, ``config_keys`` read from its resolved config,
    ``status`` and its ``metrics`` (``None``: every metric it wrote)."""
    return to_frame((read_job(path, config_keys) for path in job_dirs(root)), metrics)


def collect_wandb(
    project: str,
    filters: dict[str, Any] | None = None,
    metrics: Sequence[str] | None = DEFAULT_METRICS,
    config_keys: Sequence[str] = ("levels", "loss.target_assignment", "loss._target_"),
    api: Any = None,
) -> pd.DataFrame:
    """One row per run of a W&B project (``"entity/project"``; needs network access and a key), e.g.
    ``filters={"group": "mcl/2026-11-26_16-00-00"}`` for one multirun."""
    if api is None:
        import wandb

        api = wandb.Api()
    rows = []
    for run in api.runs(project, filters=filters or {}):
        row: dict[str, Any] = {"job": run.name, "group": run.group, "status": run.state}
        config = dict(run.config)
        row.update({key: lookup(config, key) for key in config_keys})
        row.update({k: v for k, v in dict(run.summary).items() if isinstance(v, int | float) and not k.startswith("_")})
        rows.append(row)
    return to_frame(rows, metrics)


def print_table(frame: pd.DataFrame, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column), justify="right" if pd.api.types.is_numeric_dtype(frame[column]) else "left")
    for _, row in frame.iterrows():
        table.add_row(*("" if pd.isna(v) else f"{v:.2f}" if isinstance(v, float) else str(v) for v in row))
    Console(width=200).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcl-collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a multirun folder, or entity/project with --wandb")
    parser.add_argument("--wandb", action="store_true", help="read a W&B project instead of a folder")
    parser.add_argument("--metric", action="append", help="metric column(s) to show (default: the usual ones)")
    parser.add_argument("--all-metrics", action="store_true", help="show every metric")
    parser.add_argument("--config", action="append", default=[], help="resolved config key(s) to add as columns")
    parser.add_argument("--sort", help="sort rows by this column (descending)")
    parser.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead")
    args = parser.parse_args(argv)
    metrics = None if args.all_metrics else (args.metric or DEFAULT_METRICS)
    if args.wandb and not wandb_has_key():
        print(
            "mcl-collect: --wandb reads runs from the W&B servers and needs an API key: run `wandb login` or set "
            "WANDB_API_KEY (offline runs can be synced first with `wandb sync wandb/offline-run-*`)",
            file=sys.stderr,
        )
        return 2
    try:
        if args.wandb:
            frame = collect_wandb(args.source, metrics=metrics, config_keys=args.config or ("levels",))
        else:
            frame = collect_multirun(args.source, metrics=metrics, config_keys=args.config)
    except FileNotFoundError as error:
        print(f"mcl-collect: {error}", file=sys.stderr)
        return 2
    if args.sort:
        if args.sort not in frame.columns:
            print(f"mcl-collect: --sort {args.sort!r} is not a column: {list(frame.columns)}", file=sys.stderr)
            return 2
        frame = frame.sort_values(args.sort, ascending=False)
    if args.csv:
        frame.to_csv(args.csv, index=False)
    if args.markdown:
        print(frame.to_markdown(index=False, floatfmt=".2f"))
    else:
        print_table(frame, title=str(args.source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
