"""Pretraining entry point: ``mcl-train key=value ...`` (or ``python -m mcl.train``), Hydra-composed.

:func:`train` takes a composed config and returns the metrics, so tests and notebooks call it directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import netrc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).parent / "conf")
DIRNAME_LIMIT = 120


def short_dirname(overrides: str, limit: int = DIRNAME_LIMIT) -> str:
    """A job folder name from its overrides: ``/`` (paths in values) becomes ``_``, and names longer than ``limit``
    are cut and end in a hash of the whole (file systems refuse names over 255 bytes; an Optuna trial's overrides
    easily exceed that)."""
    overrides = overrides.replace("/", "_")
    if len(overrides) <= limit:
        return overrides
    digest = hashlib.sha1(overrides.encode()).hexdigest()[:8]
    return f"{overrides[: limit - 9]}-{digest}"


if not OmegaConf.has_resolver("mcl_dirname"):
    OmegaConf.register_new_resolver("mcl_dirname", short_dirname)


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def ensure_wandb_mode() -> str:
    """Run W&B offline when no API key is configured and no mode was chosen, so a run never fails for want of one."""
    if "WANDB_MODE" not in os.environ and not wandb_has_key():
        os.environ["WANDB_MODE"] = "offline"
        log.info("No W&B API key found: logging to W&B offline (sync later with 'wandb sync').")
    return os.environ.get("WANDB_MODE", "online")


METRICS_FILE = "metrics.json"


def job_name(cfg: DictConfig) -> str:
    """``task_name``, plus the job's command-line overrides inside a Hydra run (``mcl/levels=2,seed=1``)."""
    overrides = HydraConfig.get().job.override_dirname if HydraConfig.initialized() else ""
    return f"{cfg.task_name}/{overrides}" if overrides else str(cfg.task_name)


def sweep_group(cfg: DictConfig) -> str | None:
    """The multirun folder's name (its launch time), which groups a sweep's W&B runs; ``None`` outside a multirun."""
    if not HydraConfig.initialized() or HydraConfig.get().mode.name != "MULTIRUN":
        return None
    return f"{cfg.task_name}/{Path(HydraConfig.get().sweep.dir).name}"


def is_wandb(logger_cfg: DictConfig | None) -> bool:
    return logger_cfg is not None and "wandb" in str(logger_cfg.get("_target_", "")).lower()


def instantiate_loggers(cfg: DictConfig) -> list[pl.loggers.Logger]:
    """``cfg.logger``; a W&B logger without a name is named after the job and grouped by its multirun."""
    if not cfg.get("logger"):
        return []
    loggers = []
    for logger_cfg in cfg.logger.values():
        if logger_cfg is None:
            continue
        extra = {}
        if is_wandb(logger_cfg):
            ensure_wandb_mode()
            name, group = logger_cfg.get("name") or job_name(cfg), logger_cfg.get("group") or sweep_group(cfg)
            extra = {"name": name, "group": group}
        loggers.append(hydra.utils.instantiate(logger_cfg, **extra))
    return loggers


def finish_loggers(loggers: list[pl.loggers.Logger], exit_code: int = 0) -> None:
    """Close W&B runs, so that the next job of a multirun (same process) starts its own run; a non-zero
    ``exit_code`` marks the run as failed."""
    for logger in loggers:
        if isinstance(logger, pl.loggers.WandbLogger) and logger._experiment is not None:
            logger.experiment.finish(exit_code=exit_code)


@contextmanager
def closing_loggers(trainer: pl.Trainer) -> Iterator[None]:
    """Finish the trainer's W&B runs when the block ends: failed when it raised, finished otherwise."""
    try:
        yield
    except BaseException:
        finish_loggers(trainer.loggers, exit_code=1)
        raise
    finish_loggers(trainer.loggers)


def resume_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``, or with ``auto_resume`` the job folder's ``last.ckpt`` when one exists (a requeued job)."""
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    dirpath = OmegaConf.select(cfg, "callbacks.checkpoint.dirpath")
    last = Path(dirpath) / "last.ckpt" if dirpath else None
    if cfg.get("auto_resume") and last is not None and last.is_file():
        log.info("resuming from %s (auto_resume; set auto_resume=false to start over)", last)
        return str(last)
    return None


def save_metrics(metrics: dict[str, float], output_dir: str | Path) -> Path:
    """Write ``metrics.json`` next to the job's config, where :mod:`mcl.results` finds it."""
    path = Path(output_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return path


def instantiate_callbacks(cfg: DictConfig, has_logger: bool) -> list[pl.Callback]:
    callbacks = []
    for name, callback_cfg in (cfg.get("callbacks") or {}).items():
        if callback_cfg is None or (name == "lr_monitor" and not has_logger):
            continue
        callbacks.append(hydra.utils.instantiate(callback_cfg))
    return callbacks


def instantiate_trainer(cfg: DictConfig, **overrides: Any) -> pl.Trainer:
    """The ``cfg.trainer`` Trainer with ``cfg.logger`` loggers (given the resolved config) and ``cfg.callbacks``."""
    loggers = instantiate_loggers(cfg)
    callbacks = instantiate_callbacks(cfg, has_logger=bool(loggers))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **overrides)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The single-number entries of a Lightning metrics dict, as floats."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) or (isinstance(value, torch.Tensor) and value.numel() == 1)
    }


def train(cfg: DictConfig) -> dict[str, float]:
    """Pretrain with a composed config; returns the final metrics (``val/knn_top1``, ``train/loss``, ...), which
    are also written to ``<output_dir>/metrics.json``.

    With ``validate_at_init`` it first measures the kNN top-1 of the backbone at initialisation
    (``init/knn_top1``), so a run shows what pretraining added.
    """
    pl.seed_everything(cfg.seed, workers=True)
    (Path(cfg.output_dir) / METRICS_FILE).unlink(missing_ok=True)  # a rerun in the same folder starts unfinished
    ckpt_path = resume_path(cfg)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: pl.LightningModule = hydra.utils.instantiate(cfg.method, _convert_="all")
    trainer = instantiate_trainer(cfg)

    metrics: dict[str, float] = {}
    with closing_loggers(trainer):
        if cfg.get("validate_at_init") and not ckpt_path:
            initial = trainer.validate(model, datamodule=datamodule, verbose=False)
            for results in initial:
                metrics.update({k.replace("val/", "init/"): v for k, v in scalar_metrics(results).items()})
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update(scalar_metrics(trainer.callback_metrics))
    if trainer.is_global_zero:
        save_metrics(metrics, cfg.output_dir)
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        log.info("best checkpoint: %s", checkpoint.best_model_path)
    return metrics


SUMMARY_LABELS = {"init/knn_top1": "kNN top-1 at initialisation (%)", "val/knn_top1": "kNN top-1 pretrained (%)"}


def print_summary(
    metrics: dict[str, Any], keys: tuple[str, ...] = ("init/knn_top1", "val/knn_top1", "val/acc", "train/loss")
) -> None:
    """Print the ``keys`` present in ``metrics`` as a table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mcl")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in keys:
        if key in metrics:
            table.add_row(SUMMARY_LABELS.get(key, key), f"{metrics[key]:.2f}")
    Console().print(table)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    if pl.utilities.rank_zero.rank_zero_only.rank == 0:
        print_summary(metrics)
    return metrics.get(cfg.get("optimized_metric") or "", None)


if __name__ == "__main__":
    main()
