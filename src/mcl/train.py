"""Pretraining entry point: ``mcl-train key=value ...`` (or ``python -m mcl.train``), Hydra-composed.

:func:`train` takes a composed config and returns the metrics, so tests and notebooks call it directly.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from mcl.checkpoints import LAST, check_checkpoint_kind, check_current_layout, load_checkpoint, newest_loadable
from mcl.cluster import check_world_size
from mcl.interrupts import Interruptions
from mcl.methods.base import PROGRESS_BAR_LOSS
from mcl.online_probe import probe_classes
from mcl.runs import (
    STATE_FILE,
    RunLock,
    open_run_logs,
    read_json,
    remove_stale_temporaries,
    replaced_atomically,
    write_json,
)
from mcl.runtime import (
    METRICS_FILE,
    closing_loggers,
    instantiate_trainer,
    is_wandb,
    print_summary,
    save_metrics,
    scalar_metrics,
)
from mcl.validation import check_config

log = logging.getLogger(__name__)


def checkpoint_dir(cfg: DictConfig) -> Path | None:
    dirpath = OmegaConf.select(cfg, "callbacks.last.dirpath") or OmegaConf.select(cfg, "callbacks.checkpoint.dirpath")
    return Path(dirpath) if dirpath else None


def resume_path(cfg: DictConfig) -> str | None:
    """``ckpt_path`` (checked to load, and to be a pretraining checkpoint), or with ``auto_resume`` the job folder's
    ``last.ckpt`` when one exists (a requeued job); if that one cannot be read, the newest checkpoint of the folder
    that can, with a warning."""
    if cfg.get("ckpt_path"):
        checkpoint = load_checkpoint(cfg.ckpt_path, map_location="meta")  # metadata only: no tensor data is read
        check_checkpoint_kind(checkpoint, cfg.ckpt_path, expected="pretraining", entry_point="mcl-train")
        return str(cfg.ckpt_path)
    dirpath = checkpoint_dir(cfg)
    if not cfg.get("auto_resume") or dirpath is None or not any(dirpath.glob("*.ckpt")):
        return None
    found = newest_loadable(dirpath)
    if found is None:
        raise FileNotFoundError(
            f"auto_resume: no checkpoint in {dirpath} can be read (see the warnings above); move the folder away to "
            "start over, or pass ckpt_path=... to resume from another file"
        )
    log.info("resuming from %s (auto_resume; set auto_resume=false or use another folder to start over)", found)
    return str(found)


# Hyper-parameters that decide the shape of the weights: a checkpoint must agree with the config on them.
ARCHITECTURE_KEYS = (
    "backbone",
    "neck",
    "levels",
    "head_convs",
    "projector_hidden_dim",
    "embedding_dim",
    "num_classes",
)


def check_compatible(checkpoint: dict[str, Any], checkpoint_path: str | Path, model: pl.LightningModule) -> None:
    """Stop with the differing hyper-parameters when a checkpoint was trained with another architecture."""
    saved = dict(checkpoint.get("hyper_parameters") or {})
    check_current_layout(saved, checkpoint_path)
    wanted = dict(model.hparams)
    differences = [
        f"{key}: checkpoint {saved[key]!r}, config {wanted[key]!r}"
        for key in ARCHITECTURE_KEYS
        if key in saved and key in wanted and saved[key] != wanted[key]
    ]
    if differences:
        raise ValueError(
            f"{checkpoint_path} was trained with another architecture than this config builds: "
            + "; ".join(differences)
            + ". Resume with the checkpoint's settings, or start a new run (another folder, auto_resume=false)."
        )


def finished_epochs(checkpoint: dict[str, Any]) -> int:
    """Epochs whose training the run that wrote ``checkpoint`` had finished (``last.ckpt`` is written at the end of
    an epoch, before Lightning counts it as completed, hence ``processed``)."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return int(progress.get("processed", checkpoint.get("epoch", -1) + 1))


HYDRA_SUBDIR = ".hydra"


def save_hydra_files(cfg: DictConfig, output_dir: Path) -> None:
    """Write Hydra's ``.hydra/{config,hydra,overrides}.yaml`` once this run owns the folder and will train.

    ``train.yaml`` sets ``hydra.output_subdir: null`` so that Hydra does not write them at start-up: a rerun that
    fails its checks, or a second run refused by the folder's lock, must not replace the files of the run whose
    results the folder holds (``mcl-collect`` reads them).
    """
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = output_dir / HYDRA_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "config.yaml": cfg,
        "hydra.yaml": OmegaConf.create({"hydra": hydra_cfg}),
        "overrides.yaml": hydra_cfg.overrides.task,
    }
    for name, content in files.items():
        with replaced_atomically(folder / name) as temporary:
            OmegaConf.save(content, temporary)


def validates(datamodule: pl.LightningDataModule) -> bool:
    """Whether the datamodule has labelled validation data (``has_validation``; datamodules without the property
    do)."""
    return bool(getattr(datamodule, "has_validation", True))


def check_validation_settings(cfg: DictConfig, datamodule: pl.LightningDataModule) -> None:
    """Without validation data (:func:`validates`), refuse by name the settings that need validation metrics:
    ``validate_at_init``, and an ``optimized_metric`` or checkpoint ``monitor`` on a ``val/`` key (never logged)."""
    if validates(datamodule):
        return
    needs = ["validate_at_init=true"] if cfg.get("validate_at_init") else []
    metrics = {"optimized_metric": cfg.get("optimized_metric")}
    for name, callback in (cfg.get("callbacks") or {}).items():
        metrics[f"callbacks.{name}.monitor"] = callback.get("monitor") if callback else None
    needs += [f"{key}={value}" for key, value in metrics.items() if value and str(value).startswith("val/")]
    if needs:
        raise ValueError(
            f"{', '.join(needs)}: these need validation metrics, but {type(datamodule).__name__} has no labelled "
            "validation data. Drop these settings, or (data=folder) give labelled folders for the kNN monitor with "
            "data.knn_bank_dir=... data.knn_val_dir=..."
        )


def new_wandb_id() -> str:
    """A W&B run id (8 lowercase hex characters), chosen before the run starts so that a resume can reuse it."""
    return uuid.uuid4().hex[:8]


def train(cfg: DictConfig) -> dict[str, float]:
    """Pretrain with a composed config; returns the final metrics (``val/knn_top1``, ``train/loss``, ...), which
    are also written to ``<output_dir>/metrics.json``.

    With ``validate_at_init`` it first measures the kNN top-1 of the backbone at initialisation
    (``init/knn_top1``), so a run shows what pretraining added. Data without labelled validation sets
    (``data=folder`` without kNN folders) trains without any validation loop (:func:`check_validation_settings`).
    Counts the datamodule reports (``data/skipped_images``, ``data/skipped_folders``) join the metrics.

    The run folder is owned by one run at a time (:class:`mcl.runs.RunLock`). Nothing in it changes before every
    check has passed: the config's values (:func:`mcl.validation.check_config`), the model and data it builds, the
    data's own set-up checks (sizes, readable images) and the resume checks; the job's log file opens then too
    (:class:`mcl.runs.RunLogFile`). A rerun of a finished run does nothing and returns its metrics, unless it asks for
    more epochs (it then continues from ``last.ckpt``); a resumed run keeps the earlier run's metrics that it does not
    measure again (``init/knn_top1``) and continues its W&B run.

    SIGTERM or SIGINT saves ``last.ckpt`` at the next step boundary, records the run as ``interrupted`` and raises
    :class:`mcl.interrupts.RunInterrupted` (exit status 143 or 130); the same command resumes it.
    """
    check_config(cfg)
    check_world_size(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.output_dir)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: pl.LightningModule = hydra.utils.instantiate(cfg.method, _convert_="all")
    check_validation_settings(cfg, datamodule)
    if cfg.method.get("online_probe"):
        probe_classes(datamodule)  # unlabelled data is refused now, before the run folder changes
    lock = RunLock(output_dir) if rank_zero_only.rank == 0 else None
    with Interruptions() as interruptions:
        if lock is not None:
            lock.acquire()
        try:
            return run_in_folder(cfg, output_dir, datamodule, model, interruptions)
        finally:
            if lock is not None:
                lock.release()


def run_in_folder(
    cfg: DictConfig,
    output_dir: Path,
    datamodule: pl.LightningDataModule,
    model: pl.LightningModule,
    interruptions: Interruptions,
) -> dict[str, float]:
    """The body of :func:`train`, once the run folder is ours."""
    state = read_json(output_dir / STATE_FILE)
    previous = read_json(output_dir / METRICS_FILE)
    ckpt_path = resume_path(cfg)
    max_epochs = int(cfg.trainer.max_epochs)
    if ckpt_path is not None:
        checkpoint = load_checkpoint(ckpt_path, map_location="meta")  # metadata only: no tensor data is read
        check_compatible(checkpoint, ckpt_path, model)
        done = finished_epochs(checkpoint)
        if state.get("status") == "finished" and done >= max_epochs:
            log.warning(
                "%s already holds a finished run (%d epochs, %s); nothing to do. Ask for more epochs "
                "(trainer.max_epochs=%d) to continue it, or use another folder to start over.",
                output_dir,
                done,
                LAST,
                done + 1,
            )
            return {k: float(v) for k, v in previous.items()}
    elif previous or any(output_dir.glob("**/*.ckpt")):
        raise FileExistsError(
            f"{output_dir} holds the results of an earlier run (status {state.get('status', 'unknown')!r}) and this "
            f"run would not resume it (auto_resume={cfg.get('auto_resume')}); choose another folder to start over"
        )
    # The data's own checks (sizes against the batch, readable images) run here, before the folder changes; the
    # Trainer's set-up calls it again, which then does nothing.
    datamodule.setup("fit")
    wandb_id = state.get("wandb_id") if ckpt_path else None
    if any(is_wandb(logger_cfg) for logger_cfg in (cfg.get("logger") or {}).values()):
        wandb_id = wandb_id or new_wandb_id()
    is_zero = rank_zero_only.rank == 0

    def record(status: str) -> None:
        try:
            write_json({"status": status, "max_epochs": max_epochs, "wandb_id": wandb_id}, output_dir / STATE_FILE)
        except OSError as error:  # e.g. a full disk: the error that stopped the run matters more
            log.error("could not record the run's status (%s) in %s: %s", status, STATE_FILE, error)

    if is_zero:
        open_run_logs()
        remove_stale_temporaries(output_dir)
        save_hydra_files(cfg, output_dir)
        record("running")
    # Without validation data the validation loop is off, so Lightning does not warn that it has no loaders.
    validation = {} if validates(datamodule) else {"limit_val_batches": 0}
    trainer = instantiate_trainer(cfg, wandb_id=wandb_id, **validation)
    metrics: dict[str, float] = dict(previous) if ckpt_path else {}
    try:
        with closing_loggers(trainer):
            if cfg.get("validate_at_init") and not ckpt_path:
                with interruptions.trainer_call():
                    initial = trainer.validate(model, datamodule=datamodule, verbose=False)
                for results in initial:
                    metrics.update({k.replace("val/", "init/"): v for k, v in scalar_metrics(results).items()})
            with interruptions.trainer_call():
                trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
            final = scalar_metrics(trainer.callback_metrics)
            metrics.update({key: value for key, value in final.items() if key != PROGRESS_BAR_LOSS})
            if hasattr(datamodule, "data_report"):
                metrics.update(datamodule.data_report())
    except BaseException as error:
        stop = interruptions.exit_for(error)
        if is_zero:
            record("interrupted" if stop is not None else "failed")
        if stop is not None:
            raise stop from error
        raise
    if trainer.is_global_zero:
        save_metrics(metrics, output_dir)
        record("finished")
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        log.info("best checkpoint: %s", checkpoint.best_model_path)
    return metrics


def run_main(cfg: DictConfig) -> float | None:
    """``mcl-train`` once :mod:`mcl.launch` has composed the config and checked its values and world size: train,
    print the summary table (rank 0) and return ``optimized_metric`` to a sweeper."""
    metrics = train(cfg)
    if pl.utilities.rank_zero.rank_zero_only.rank == 0:
        method = str(cfg.method._target_).rsplit(".", 1)[-1]
        title = f"{cfg.task_name}: {method}, {cfg.levels} level(s), {cfg.backbone.name}, {cfg.image_size} px"
        print_summary(metrics, ("init/knn_top1", "val/knn_top1", "val/acc", "train/loss"), title)
    return metrics.get(cfg.get("optimized_metric") or "", None)


from mcl.launch import main  # noqa: E402  (the console script's entry point, light to import)

if __name__ == "__main__":
    main()
