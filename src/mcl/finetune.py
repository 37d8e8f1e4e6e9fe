"""``mcl-finetune``: transfer pretrained weights to a dense task, chosen by ``task`` (Hydra, ``conf/finetune.yaml``
and ``conf/task/``): ``detection`` (:mod:`mcl.detection.finetune`) or ``semantic`` segmentation
(:mod:`mcl.segmentation.finetune`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from mcl.detection.finetune import finetune as finetune_detection
from mcl.runs import open_run_logs
from mcl.runtime import CONFIG_DIR, print_summary
from mcl.segmentation.finetune import finetune_semantic
from mcl.validation import check_config

# task -> (the function that fine-tunes and evaluates, the metrics the summary shows)
TASKS: dict[str, tuple[Callable[[DictConfig], dict[str, Any]], tuple[str, ...]]] = {
    "detection": (
        finetune_detection,
        ("val/AP", "val/AP50", "val/AP75", "val/APs", "val/APm", "val/APl", "val/mask_AP"),
    ),
    "semantic": (finetune_semantic, ("val/mIoU", "val/pixel_accuracy")),
}


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune and evaluate for ``cfg.task``; returns the task's metrics."""
    task = cfg.get("task", "detection")
    if task not in TASKS:
        raise ValueError(f"task={task!r} is invalid: use one of {tuple(TASKS)}")
    return TASKS[task][0](cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="finetune")
def main(cfg: DictConfig) -> float | None:
    check_config(cfg)
    open_run_logs()  # the job's log file (mcl.runs.RunLogFile)
    metrics = finetune(cfg)
    if pl.utilities.rank_zero.rank_zero_only.rank == 0:
        source = cfg.model.pretrained or "random initialisation"
        title = f"mcl-finetune task={cfg.task}: {cfg.model.arch} {cfg.model.backbone} from {source}"
        print_summary(metrics, TASKS[cfg.task][1], title)
    return metrics.get(cfg.get("optimized_metric") or "", None)


if __name__ == "__main__":
    main()
