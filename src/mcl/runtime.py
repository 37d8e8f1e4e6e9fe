"""What every entry point (``mcl-train``, ``mcl-linear``, ``mcl-finetune``, ``mcl-collect``) needs around its
Trainer: W&B's mode, loggers, callbacks and the Trainer from a composed config, the ``metrics.json`` file; where the
configs are and their resolvers come from :mod:`mcl.configs` (re-exported here).
"""

from __future__ import annotations

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

from mcl.checkpoints import AtomicCheckpointIO
from mcl.cluster import check_world_size
from mcl.configs import CONFIG_DIR, short_dirname  # noqa: F401  (re-exported: entry points and tests import them here)
from mcl.runs import write_json
from mcl.syncbn import SyncBatchNormPlugin

log = logging.getLogger(__name__)


METRICS_FILE = "metrics.json"


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


def instantiate_loggers(cfg: DictConfig, wandb_id: str | None = None) -> list[pl.loggers.Logger]:
    """``cfg.logger``; a W&B logger without a name is named after the job and grouped by its multirun. With
    ``wandb_id`` the W&B run gets that id and continues the run of that id if it exists (a resumed job)."""
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
            if wandb_id:
                extra.update(id=wandb_id, resume="allow")
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


def save_metrics(metrics: dict[str, float], output_dir: str | Path) -> Path:
    """Write ``metrics.json`` (atomically) next to the job's config, where :mod:`mcl.results` finds it."""
    return write_json(metrics, Path(output_dir) / METRICS_FILE)


def instantiate_callbacks(cfg: DictConfig, has_logger: bool) -> list[pl.Callback]:
    callbacks = []
    for name, callback_cfg in (cfg.get("callbacks") or {}).items():
        if callback_cfg is None or (name == "lr_monitor" and not has_logger):
            continue
        callbacks.append(hydra.utils.instantiate(callback_cfg))
    return callbacks


def cudnn_benchmark() -> bool:
    """``torch.backends.cudnn.benchmark`` as GPU training sets it (``conf/trainer/gpu.yaml``'s ``benchmark``): the
    benchmarks use this value so that their GPU figures are those of training."""
    return bool(OmegaConf.load(Path(CONFIG_DIR) / "trainer" / "gpu.yaml").get("benchmark", False))


def instantiate_trainer(cfg: DictConfig, wandb_id: str | None = None, **overrides: Any) -> pl.Trainer:
    """The ``cfg.trainer`` Trainer with ``cfg.logger`` loggers (given the resolved config) and ``cfg.callbacks``;
    checkpoints are written atomically and read with ``weights_only=True`` (:mod:`mcl.checkpoints`). A world size
    that cannot be reached stops here (:func:`mcl.cluster.check_world_size`).

    ``sync_batchnorm: true`` synchronises BatchNorm with :class:`~mcl.syncbn.SyncBatchNormPlugin` rather than torch's
    ``nn.SyncBatchNorm`` (GPUs only, a host sync per call): the Trainer gets the plugin and ``sync_batchnorm=False``
    (Lightning would apply torch's for ``True``, and refuses ``True`` beside another plugin); its DDP strategy applies
    the plugin when fitting, on CPUs (gloo) and GPUs (NCCL) alike."""
    check_world_size(cfg)
    loggers = instantiate_loggers(cfg, wandb_id)
    callbacks = instantiate_callbacks(cfg, has_logger=bool(loggers))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    plugins: list[Any] = [AtomicCheckpointIO()]
    if overrides.pop("sync_batchnorm", cfg.trainer.get("sync_batchnorm", False)):
        plugins.append(SyncBatchNormPlugin())
    return hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=plugins, sync_batchnorm=False, **overrides
    )


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The single-number entries of a Lightning metrics dict, as floats."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) or (isinstance(value, torch.Tensor) and value.numel() == 1)
    }


SUMMARY_LABELS = {"init/knn_top1": "kNN top-1 at initialisation (%)", "val/knn_top1": "kNN top-1 pretrained (%)"}


def print_summary(metrics: dict[str, Any], keys: tuple[str, ...], title: str) -> None:
    """Print the ``keys`` present in ``metrics`` as a table headed ``title`` (what ran)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in keys:
        if key in metrics:
            table.add_row(SUMMARY_LABELS.get(key, key), f"{metrics[key]:.2f}")
    Console().print(table)
