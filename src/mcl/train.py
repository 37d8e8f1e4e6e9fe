"""Pretraining entry point: ``mcl-train key=value ...`` (or ``python -m mcl.train``), Hydra-composed.

:func:`train` takes a composed config and returns the metrics, so tests and notebooks call it directly.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).parent / "conf")


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


def instantiate_loggers(cfg: DictConfig) -> list[pl.loggers.Logger]:
    if not cfg.get("logger"):
        return []
    if any("wandb" in str(c.get("_target_", "")).lower() for c in cfg.logger.values()):
        ensure_wandb_mode()
    return [hydra.utils.instantiate(c) for c in cfg.logger.values() if c is not None]


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
    """Pretrain with a composed config; returns the final metrics (``val/knn_top1``, ``train/loss``, ...).

    With ``validate_at_init`` it first measures the kNN top-1 of the backbone at initialisation
    (``init/knn_top1``), so a run shows what pretraining added.
    """
    pl.seed_everything(cfg.seed, workers=True)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: pl.LightningModule = hydra.utils.instantiate(cfg.method, _convert_="all")
    trainer = instantiate_trainer(cfg)

    metrics: dict[str, float] = {}
    if cfg.get("validate_at_init") and not cfg.get("ckpt_path"):
        initial = trainer.validate(model, datamodule=datamodule, verbose=False)
        for results in initial:
            metrics.update({k.replace("val/", "init/"): v for k, v in scalar_metrics(results).items()})
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics.update(scalar_metrics(trainer.callback_metrics))
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
