"""Transfer benchmark (``make transfer``): does pretraining help detection on Fashion-MNIST canvases, beyond noise?

Every row pretrains a ResNet-18 on the same Fashion-MNIST images for the same number of epochs (or not at all),
is measured frozen (kNN and linear-probe top-1), and then fine-tunes the same detector (``--arch``: Faster R-CNN
R18-FPN v2 by default; ``fasterrcnn_c4``/``maskrcnn_c4`` for the single-map C4 family) on canvases of
Fashion-MNIST items pasted at widely varying scales, under one protocol:

- the same trainable parts for every row: by default the backbone frozen as pretrained (``--frozen-stages 5``: what
  the representation gives a detector; a supervised control on the canvases' own items beats random weights here)
  with the FPN, RPN and box head trained; ``--frozen-stages 0`` trains every stage as the SSL detection configs do
  (on these 360 canvases random weights learn the items as fast as pretrained ones: see docs/transfer.md); the C4
  detectors' default is ``--frozen-stages 4``: the stages up to the C4 map they read frozen, their RoI head (res5),
  RPN and predictors trained, the same split between the representation and the detector's own heads;
- BatchNorm everywhere (backbone, FPN, box head) normalising with batch statistics, as the SyncBN detection configs
  of the SSL literature do; the input normalised as in pretraining;
- a learning rate chosen per row from a grid, by AP on a held-out part of the training canvases (never on the
  validation canvases), with fine-tuning seed 0;
- then ``--seeds`` fine-tunings at that rate on all training canvases, evaluated on the validation canvases, with
  AP on COCO's scale ranges and on the objects' own area thirds (``APs3``/``APm3``/``APl3``).

A row is called better than random initialisation only when its mean AP exceeds it by more than twice the combined
standard error of the two means. Every finished run is cached under ``benchmarks/runs`` by its settings, so an
interrupted benchmark resumes where it stopped. Writes ``benchmarks/results/transfer{,_full,_large,_<tag>}.md``
and ``.json`` and the AP-by-IoU plot with seed spread (the paper's Fig. 6 on this data).

``--task semantic`` fine-tunes a semantic-FPN segmenter (``mcl-finetune task=semantic``) on the same canvases
instead, with the same rows, seeds, cached pretrainings, learning-rate choice (by mIoU on the held-out canvases) and
verdict rule, and writes ``transfer_semantic{,_<settings>}.md`` and ``.json`` with mIoU, pixel accuracy and IoU per
class.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from mcl.backbones import Backbone
from mcl.data import FashionMNISTDataModule
from mcl.detection.analysis import plot_ap_by_iou_seeds, plot_scale_spread
from mcl.detection.coco import split_annotations
from mcl.detection.fashion_canvas import CanvasSpec, build_fashion_canvas, object_scale_spread
from mcl.detection.models import ARCHITECTURES, C4_ARCHITECTURES, C4_ROI_POOL_SIZE, MASK_ARCHITECTURES
from mcl.detection.probe import PLACES, object_probe_top1, read_objects
from mcl.finetune import finetune
from mcl.knn import knn_top1
from mcl.linear import feature_probe_top1, frozen_backbone, loader_features
from mcl.pyramid import interp_min_image_size
from mcl.results import compare_nested, mean_std
from mcl.runs import read_json, write_json
from mcl.runtime import CONFIG_DIR
from mcl.train import train

ROOT = Path(__file__).resolve().parent
FMNIST_MEAN, FMNIST_STD = [0.286] * 3, [0.353] * 3
BASELINE = "random init"
ROI_LEVELS = {
    "torchvision": "torchvision's level rule (a 224 px RoI on P4, so every object here on P2)",
    "pretraining": "the pretraining's scales (a view-sized RoI on P5, half that on P4, ...)",
}
ARCH_NAMES = {
    "fasterrcnn_v2": "Faster R-CNN R18-FPN v2",
    "maskrcnn_v2": "Mask R-CNN R18-FPN v2",
    "retinanet_v2": "RetinaNet R18-FPN v2",
    "fasterrcnn_c4": "Faster R-CNN R18-C4",
    "maskrcnn_c4": "Mask R-CNN R18-C4",
}
# On CPU cores: the C4 detectors run res5 on every sampled RoI, a training step 10 times the FPN detector's at 32
# RoIs of 14x14 (benchmarks/detector_step.py); half the RoIs and 7x7 RoIAlign (4x4 out of res5; the canvases' C4 map
# is 6x6) make it 2 times, a fine-tuning about 5 minutes on 2 CPU cores instead of 25.
C4_SIZING = {"rois": 16, "roi_pool_size": 7}
DEFAULT_ARCH = "fasterrcnn_v2"
# --task -> the metric that picks the lr and decides a verdict (val/<metric>), and its secondary columns.
TASK_METRICS = {"detection": ("AP", ("AP50", "AP75")), "semantic": ("mIoU", ("pixel_accuracy",))}
SEMANTIC_ARCH = "semantic_fpn"
SECONDARY_NAMES = {"AP50": "AP50", "AP75": "AP75", "pixel_accuracy": "pixel accuracy"}
# frozen_stages -> what fine-tuning trains (mcl-finetune's model.frozen_stages, detectron2's FREEZE_AT).
FROZEN = {
    0: "every backbone stage trained",
    **{n: f"the first {n} backbone stages frozen (stem = 1), the rest trained" for n in range(1, 5)},
    5: "the backbone frozen (the representation as pretrained; BN still normalises with batch statistics), "
    "FPN, RPN and box head trained",
}
# The same for the C4 detectors, whose RoI head is the ResNet's res5.
FROZEN_C4 = {
    **FROZEN,
    4: "the stem and res2..res4 frozen (C4, the map the detector reads, as pretrained; BN still normalises with "
    "batch statistics), res5 (the RoI head, starting from the loaded res5), RPN and predictors trained",
    5: "the whole ResNet frozen, res5 (the RoI head) included; RPN and predictors trained",
}
# name -> mcl-train overrides (None: no pretraining).
ROWS: dict[str, list[str] | None] = {
    BASELINE: None,
    "supervised": ["method=supervised", "levels=1", "method.classifier_input=pooled_c5"],
    "supervised multi-level": ["method=supervised", "levels=3"],
    "MCL, 1 level": ["levels=1"],
    "MCL, 3 levels": ["levels=3"],
    "MCL, 3 levels, same-level": ["levels=3", "loss.target_assignment=same-level"],
    # The single-map neck that pretrains for the C4 detectors. Stage 4 (C4 resized per level) at the benchmark's
    # 32 px, where C5 is 1x1 and stage 5 would give every tile of levels 1-2 the same feature (refused).
    "MCL, 3 levels, interp C4": ["levels=3", "neck=interp", "neck.stage=4"],
    # Stage 5 (the library's default for C4 transfer: it also pretrains res5) needs C5 of 2x2 or more: --large's
    # 64 px views.
    "MCL, 3 levels, interp C5": ["levels=3", "neck=interp", "neck.stage=5"],
}
# Rows whose pretraining needs views of at least this many pixels (what the interp neck accepts).
MIN_IMAGE_SIZE = {"MCL, 3 levels, interp C5": interp_min_image_size(stage=5, levels=3)}
DEFAULT_ROWS = (BASELINE, "supervised", "supervised multi-level", "MCL, 1 level", "MCL, 3 levels")
SETTINGS = {
    # The default: every required row, 3 pretraining seeds per pretrained row and 2 fine-tuning seeds per pretraining
    # (random init: 6 seeds, its own initialisation each), within 2 hours on 2 CPU cores with 2 runs at a time.
    # Pretraining at 32 px (Fashion-MNIST is 28 px) and a 64-channel FPN/box head keep it there; objects on the 96 px
    # canvases span 8..72 px, the scales that the 32 px views and their 16 and 8 px montage cells cover.
    "default": dict(
        rows=DEFAULT_ROWS, probe_images=(5000, 2000), pretrain_seeds=3, pretrain_epochs=3, pretrain_images=5760,
        image_size=32, width=64, pretrain_workers=0,
        train_canvases=360, heldout_fraction=0.2, val_canvases=300, canvas=96, finetune_epochs=4,
        lrs=(0.02, 0.05), seeds=2, batch_size=4, rois=32, accelerator="cpu", workers=0, frozen_stages=5,
    ),
    # Every row the 32 px views allow, with the default's seeds: the reference table (about 3 hours on 2 CPU cores).
    "full": dict(
        rows=tuple(row for row in ROWS if row not in MIN_IMAGE_SIZE), probe_images=(5000, 2000), pretrain_seeds=3,
        pretrain_epochs=3, pretrain_images=5760, image_size=32, width=64, pretrain_workers=0,
        train_canvases=360, heldout_fraction=0.2, val_canvases=300, canvas=96, finetune_epochs=4,
        lrs=(0.02, 0.05), seeds=2, batch_size=4, rois=32, accelerator="cpu", workers=0, frozen_stages=5,
    ),
    # One GPU (an estimate, not yet run: about 10 minutes per pretraining seed): all 60k Fashion-MNIST images for 4
    # epochs at batch 256 and 64 px, the library's 256-channel FPN, 1,200 canvases of 128 px; the default's rows and
    # seeds.
    "large": dict(
        rows=DEFAULT_ROWS, probe_images=(10000, 10000), pretrain_seeds=3, pretrain_epochs=4, pretrain_images=60000,
        image_size=64, width=256, pretrain_workers=8, pretrain_overrides=("batch_size=256",),
        train_canvases=1200, heldout_fraction=0.2, val_canvases=600, canvas=128, finetune_epochs=4,
        lrs=(0.02, 0.05), seeds=2, batch_size=16, rois=64, accelerator="gpu", workers=6, frozen_stages=5,
    ),
    # A smoke test of the whole pipeline (the test suite runs it): the baseline and one pretrained row, two
    # pretraining seeds.
    "quick": dict(
        rows=(BASELINE, "MCL, 3 levels"), probe_images=(500, 200), pretrain_seeds=2, pretrain_epochs=1,
        pretrain_images=128, image_size=32, width=32, pretrain_workers=0,
        train_canvases=10, heldout_fraction=0.2, val_canvases=6, canvas=64,
        finetune_epochs=1, lrs=(0.02, 0.05), seeds=1, batch_size=2, rois=16, accelerator="cpu", workers=0,
        frozen_stages=5,
    ),
}  # fmt: skip


def key(settings: dict[str, Any]) -> str:
    """A short stable hash of a run's settings: its cache folder's suffix."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def slug(name: str) -> str:
    return name.replace(", ", "_").replace(" ", "_").replace("-", "_")


def cached(folder: Path, settings: dict[str, Any], run) -> dict[str, Any]:
    """``run()``'s result, stored in ``folder/result.json`` with ``settings`` and reused when they match. Both are
    kept as JSON holds them (paths and the like as strings), so a fresh result and a cached one read alike."""
    settings, result_file = as_json(settings), folder / "result.json"
    stored = read_json(result_file)
    if stored.get("settings") == settings:
        return stored["result"]
    started = time.perf_counter()
    result = as_json({**run(), "seconds": time.perf_counter() - started})
    write_json({"settings": settings, "result": result}, result_file)
    return result


def as_json(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def composed(config: str, overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config, overrides)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return cfg


def pretrain_overrides(row: str, seed: int, s: dict[str, Any]) -> list[str]:
    """The ``mcl-train`` overrides of one row's pretraining with one seed under the settings ``s``."""
    return [
        *ROWS[row], f"seed={seed}", f"trainer.max_epochs={s['pretrain_epochs']}",
        f"data.train_size={s['pretrain_images']}", f"image_size={s['image_size']}",
        f"neck.out_channels={s['width']}",
        f"trainer.accelerator={s['accelerator']}", "trainer.enable_progress_bar=false", "validate_at_init=false",
        "logger=csv", f"data.num_workers={s['pretrain_workers']}", *s.get("pretrain_overrides", ()),
    ]  # fmt: skip


def pretrain(row: str, seed: int, s: dict[str, Any]) -> dict[str, Any]:
    """Pretrain one row with one seed; returns the checkpoint path, final kNN top-1 and time."""
    names = ("pretrain_epochs", "pretrain_images", "image_size", "width")
    settings = {"row": ROWS[row], "seed": seed, **{k: s[k] for k in names}}
    settings["accelerator"] = s["accelerator"]
    if s.get("pretrain_overrides"):
        settings["overrides"] = list(s["pretrain_overrides"])
    folder = s["runs"] / f"pretrain_{slug(row)}_seed{seed}_{key(settings)}"
    overrides = pretrain_overrides(row, seed, s)

    def run() -> dict[str, Any]:
        metrics = train(composed("train", overrides, folder / "run"))
        return {"checkpoint": str(folder / "run" / "checkpoints" / "last.ckpt"), "metrics": metrics}

    return cached(folder, settings, run)


def probed_backbone(checkpoint: str | None, image_size: int, seed: int) -> Backbone:
    """The frozen backbone of a checkpoint, or a randomly initialised one (seeded) when there is none."""
    if checkpoint:
        return frozen_backbone(checkpoint)[0]
    torch.manual_seed(seed)
    return Backbone("resnet18", image_size=image_size).requires_grad_(False).eval()


def flat_pixels(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*((x.flatten(1), y) for x, y in loader), strict=True)
    return torch.cat(images), torch.cat(labels)


def probe(
    row: str,
    seed: int,
    checkpoint: str | None,
    s: dict[str, Any],
    canvases: dict[str, Path] | None = None,
    pixels: bool = False,
) -> dict[str, float]:
    """kNN (k=200, as the training monitor) and linear-probe top-1 of the frozen backbone on Fashion-MNIST test
    images, with a bank / probe training set of Fashion-MNIST training images (``probe_images``: their counts).
    ``pixels=True`` probes the normalised pixels themselves: the reference a useful backbone should pass.
    With the canvases (``canvases``), also the object probes of ``mcl.detection.probe`` (fitted on the training
    canvases' objects, tested on the validation canvases'): in place (RoIAlign of C3-C5 over each box of the whole
    canvas), centred and moved (the box alone at the centre / a random place of an empty canvas, pooled C5)."""
    settings = {"row": row, "seed": seed, "checkpoint": checkpoint, **{k: s[k] for k in ("image_size", "probe_images")}}
    if pixels:
        settings["features"] = "pixels"
    elif canvases:
        settings["objects"] = str(canvases["root"])
    folder = s["runs"] / f"probe_{slug(row)}_seed{seed}_{key(settings)}"

    def run() -> dict[str, float]:
        data = FashionMNISTDataModule(
            image_size=s["image_size"], batch_size=256, views_per_side=1, view_mode="supervised",
            train_size=None, bank_size=s["probe_images"][0], val_size=s["probe_images"][1], num_workers=s["workers"],
            mean=FMNIST_MEAN, std=FMNIST_STD, seed=0,
        )  # fmt: skip
        data.setup("fit")
        bank_loader, val_loader = data.val_dataloader()
        if pixels:
            bank, test = flat_pixels(bank_loader), flat_pixels(val_loader)
        else:
            backbone = probed_backbone(checkpoint, s["image_size"], seed)
            bank, test = loader_features(backbone, bank_loader), loader_features(backbone, val_loader)
        result = {
            "knn_top1": knn_top1(test[0], test[1], bank[0], bank[1]),
            "linear_top1": feature_probe_top1(bank, test),
        }
        if canvases and not pixels:
            train_objects = read_objects(canvases["train_images"], canvases["train"], FMNIST_MEAN, FMNIST_STD)
            val_objects = read_objects(canvases["val_images"], canvases["val"], FMNIST_MEAN, FMNIST_STD)
            for place in PLACES:
                result[f"objects_{place}_top1"] = object_probe_top1(backbone, train_objects, val_objects, place)
        return result

    return cached(folder, settings, run)


def fine_tune(
    row: str, checkpoint: str | None, lr: float, seed: int, split: str, data: dict[str, Path], s: dict[str, Any]
) -> dict[str, Any]:
    """One fine-tuning: ``split="heldout"`` trains on the fit part and evaluates on the held-out part of the training
    canvases (learning-rate choice); ``split="val"`` trains on all training canvases and evaluates on validation."""
    train_annotations, val_images, val_annotations = {
        "heldout": (data["fit"], data["train_images"], data["heldout"]),
        "val": (data["train"], data["val_images"], data["val"]),
    }[split]
    names = ("canvas", "finetune_epochs", "batch_size", "rois", "width", "accelerator")
    names += ("train_canvases", "val_canvases")
    settings = {"row": row, "checkpoint": checkpoint, "lr": lr, "seed": seed, "split": split}
    settings.update({k: s[k] for k in names})
    settings["arch"] = s["arch"]
    c4_sizing = []
    if s["arch"] in C4_ARCHITECTURES:
        settings["roi_pool_size"] = s["roi_pool_size"]
        c4_sizing = [f"model.roi_pool_size={s['roi_pool_size']}"]
    if s.get("finetune_overrides"):
        settings["overrides"] = list(s["finetune_overrides"])
    roi_levels = []
    if s.get("roi_levels", "torchvision") == "pretraining":
        settings["roi_levels"] = "pretraining"
        roi_levels = [f"model.roi_canonical_scale={s['image_size']}", "model.roi_canonical_level=5"]
    semantic = s.get("task", "detection") == "semantic"
    if semantic:  # detection's settings keep their keys (and cached runs) as they were
        settings["task"] = "semantic"
    folder = s["runs"] / f"finetune_{s['arch']}_{slug(row)}_{split}_lr{lr:g}_seed{seed}_{key(settings)}"
    detector = [
        f"model.min_size={s['canvas']}", f"model.max_size={s['canvas']}", f"model.rois_per_image={s['rois']}",
        "model.proposals_train=200", "model.proposals_test=50",
    ]  # fmt: skip
    # The segmenter's head as wide as the pyramid (the detectors' box head is too).
    task = ["task=semantic", f"model.head_channels={s['width']}"] if semantic else detector
    overrides = [
        *task, f"model.arch={s['arch']}", f"seed={seed}", f"data.root={data['root']}",
        f"data.train_annotations={train_annotations}",
        f"data.val_images={val_images}", f"data.val_annotations={val_annotations}",
        f"data.batch_size={s['batch_size']}", f"data.num_workers={s['workers']}",
        f"detection_schedule.max_epochs={s['finetune_epochs']}", "detection_schedule.warmup_steps=50",
        f"optimizer.lr={lr}", f"model.fpn_channels={s['width']}",
        f"model.image_mean={FMNIST_MEAN}", f"model.image_std={FMNIST_STD}",
        f"model.pretrained={checkpoint}" if checkpoint else "model.pretrained=null",
        f"trainer.accelerator={s['accelerator']}", "trainer.enable_progress_bar=false",
        f"+trainer.check_val_every_n_epoch={s['finetune_epochs']}", "trainer.num_sanity_val_steps=0",
        "~callbacks.checkpoint", "~callbacks.last", "logger=csv", *roi_levels, *c4_sizing,
        *s.get("finetune_overrides", ()),
    ]  # fmt: skip
    return cached(folder, settings, lambda: finetune(composed("finetune", overrides, folder / "run")))


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


class Runner:
    """Runs the benchmark's independent runs (pretrainings, probes, fine-tunings): in this process (``jobs=1``) or
    in ``jobs`` spawned processes with ``threads`` torch threads each, fed in submission order. On 2 CPU cores two
    single-threaded runs at a time do 1.6 times the work of one run on both cores (a Faster R-CNN training step at
    the default settings: 0.23 s on 2 threads, 0.28 s each for two at once; the models are too small to keep two
    threads busy)."""

    def __init__(self, jobs: int, threads: int) -> None:
        self.jobs = jobs
        self.pool = None
        if jobs > 1:
            context = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_set_threads, initargs=(threads,))

    def submit(self, function, *args) -> Future:
        if self.pool:
            return self.pool.submit(function, *args)
        future: Future = Future()
        future.set_result(function(*args))
        return future

    def map_rows(self, function, rows) -> dict[str, Any]:
        """``{row: function(row)}``, the rows side by side (each waiting on its own runs) when runs go to processes."""
        if not self.pool:
            return {row: function(row) for row in rows}
        with ThreadPoolExecutor(len(rows)) as threads:
            return dict(zip(rows, threads.map(function, rows), strict=True))

    def close(self, cancel: bool = False) -> None:
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=cancel)


def run_row(row: str, data: dict[str, Path], s: dict[str, Any], log, runner: Runner) -> dict[str, Any]:
    """One row: its pretrainings (``pretrain_seeds``), each probed frozen; the learning rate chosen once per row on
    the first pretraining (fine-tuning seed 0, held-out canvases); then ``seeds`` fine-tunings at that rate from each
    pretraining. Random init has no pretraining to repeat: its ``pretrain_seeds x seeds`` fine-tunings each start
    from their own seeded initialisation, one group."""
    pretrained = ROWS[row] is not None
    pretrain_seeds = list(range(s["pretrain_seeds"] if pretrained else 1))
    if pretrained:
        jobs = [runner.submit(pretrain, row, seed, s) for seed in pretrain_seeds]
        pretrainings = [job.result() for job in jobs]
    else:
        pretrainings = [None]
    checkpoints = [p["checkpoint"] if p else None for p in pretrainings]
    probes = [runner.submit(probe, row, seed, c, s, data) for seed, c in zip(pretrain_seeds, checkpoints, strict=True)]
    # One learning rate: nothing to choose, no held-out runs.
    lrs = s["lrs"] if len(s["lrs"]) > 1 else ()
    grid_jobs = {lr: runner.submit(fine_tune, row, checkpoints[0], lr, 0, "heldout", data, s) for lr in lrs}
    grid = {lr: job.result() for lr, job in grid_jobs.items()}
    metric = TASK_METRICS[s.get("task", "detection")][0]
    best_lr = max(grid, key=lambda lr: grid[lr][f"val/{metric}"]) if grid else s["lrs"][0]
    tune_seeds = range(s["seeds"] if pretrained else s["seeds"] * s["pretrain_seeds"])
    run_jobs = [
        [runner.submit(fine_tune, row, c, best_lr, seed, "val", data, s) for seed in tune_seeds] for c in checkpoints
    ]
    result: dict[str, Any] = {"pretrainings": []}
    for index, (seed, pretrained_run) in enumerate(zip(pretrain_seeds, pretrainings, strict=True)):
        runs = [job.result() for job in run_jobs[index]]
        result["pretrainings"].append(
            {
                "seed": seed,
                "pretrain_s": pretrained_run["seconds"] if pretrained_run else 0.0,
                "pretrain_metrics": pretrained_run["metrics"] if pretrained_run else {},
                **probes[index].result(),
                # The grid ran on the first pretraining; its lr holds for the row.
                heldout_key(metric): {f"{lr:g}": grid[lr][f"val/{metric}"] for lr in grid} if index == 0 else {},
                "lr": best_lr,
                "grid_s": sum(g["seconds"] for g in grid.values()) if index == 0 else 0.0,
                "runs": runs,
            }
        )
        values = ", ".join(f"{r[f'val/{metric}']:.2f}" for r in runs)
        log(f"{row} (pretraining seed {seed}): lr {best_lr:g}, {metric} {values}")
    return result


def heldout_key(metric: str) -> str:
    """Where a row keeps the held-out ``metric`` of each lr: ``heldout_ap_by_lr``, ``heldout_miou_by_lr``."""
    return f"heldout_{metric.lower()}_by_lr"


def groups(result: dict[str, Any], stat: str | Callable[[dict[str, Any]], float]) -> list[list[float]]:
    """``stat`` (a metric's name after ``val/``, or a function of a run's metrics) of every fine-tuning, one list
    per pretraining seed."""
    value = stat if callable(stat) else lambda run: run[f"val/{stat}"]
    return [[value(run) for run in p["runs"]] for p in result["pretrainings"]]


def pooled(result: dict[str, Any], stat: str) -> tuple[float, float]:
    """A row's ``stat``: the mean of its per-pretraining means, and the spread a reader should see: the standard
    deviation of the per-pretraining means (pretraining spread plus what fine-tuning noise is left in each mean);
    with one pretraining (random init, or one seed) the standard deviation over its fine-tuning seeds."""
    row_groups = groups(result, stat)
    if len(row_groups) == 1:
        return mean_std(row_groups[0])
    return mean_std([mean_std(group)[0] for group in row_groups])


def pretraining_mean(result: dict[str, Any], key_name: str) -> tuple[float, float]:
    """Mean and standard deviation over pretraining seeds of a per-pretraining value (a kNN or linear top-1)."""
    return mean_std([p[key_name] for p in result["pretrainings"]])


def frozen_cell(result: dict[str, Any], key_name: str) -> str:
    """A per-pretraining value for a table: ``mean ± std`` over pretraining seeds, the value alone with one."""
    mean, std = pretraining_mean(result, key_name)
    return f"{mean:.1f} ± {std:.1f}" if len(result["pretrainings"]) > 1 else f"{mean:.1f}"


def versus(
    results: dict[str, dict], row: str, baseline: str, stat: str | Callable[[dict[str, Any]], float]
) -> dict[str, float | str]:
    """``row`` against ``baseline`` on ``stat`` (:func:`mcl.results.compare_nested`): gap of the means, twice the
    nested standard error, verdict. A pretrained side with fewer than two pretraining seeds is never called better
    or worse."""
    comparison = compare_nested(groups(results[row], stat), groups(results[baseline], stat))
    if ROWS[baseline] is not None and len(results[baseline]["pretrainings"]) < 2:
        comparison["verdict"] = "within noise"
    return comparison


def run_minutes(results: dict[str, dict], pixels: dict) -> float:
    """Minutes that every pretraining, probe and fine-tuning took when it ran (cached runs included)."""
    seconds = pixels["seconds"]
    for result in results.values():
        for p in result["pretrainings"]:
            seconds += p["pretrain_s"] + p["seconds"] + p["grid_s"] + sum(run["seconds"] for run in p["runs"])
    return seconds / 60


def machine() -> str:
    if torch.cuda.is_available():
        return f"one {torch.cuda.get_device_name()}"
    return f"{os.cpu_count()} CPU cores"


def pm(pair: tuple[float, float]) -> str:
    return "{:.1f} ± {:.1f}".format(*pair)


def against_baseline(results: dict[str, dict], row: str, stat: str) -> str:
    """The row's ``stat`` against random init's: the gap, twice its nested standard error and the verdict."""
    if row == BASELINE:
        return "-"
    c = versus(results, row, BASELINE, stat)
    return f"{c['gap']:+.1f} ± {c['two_se']:.1f}: {c['verdict']}"


def table(header: list[str], rows: list[list[str]], aligns: list[str] | None = None) -> list[str]:
    """A markdown table's lines; ``aligns``: one ``---:`` or ``---`` per column (default: the first left, the rest
    right)."""
    aligns = aligns or ["---"] + ["---:"] * (len(header) - 1)
    return ["| " + " | ".join(cells) + " |" for cells in (header, aligns, *rows)]


def protocol_text(results: dict[str, dict], s: dict[str, Any], name: str, spread: dict, ranges, minutes: float,
                  pixels: dict) -> list[str]:  # fmt: skip
    """The title and the paragraphs that say what produced the tables and how to read them."""
    semantic = s.get("task", "detection") == "semantic"
    title = "semantic FPN R18 (segmentation)" if semantic else ARCH_NAMES[s["arch"]]
    evaluated = (
        "mIoU over the 11 classes (background included) and pixel accuracy."
        if semantic
        else f"Object scale sqrt(area): mean {spread['mean']:.1f} px, std {spread['std']:.1f} px; area thirds "
        f"(APs3/APm3/APl3) split at {ranges[0][1]:.0f} and {ranges[1][1]:.0f} px²."
    )
    return [
        f"# Transfer benchmark ({name}): Fashion-MNIST canvases, {title}",
        "",
        f"Produced by `{s['command']}` "
        f"on {machine()}: {run_minutes(results, pixels):.0f} min of pretraining, probing and fine-tuning in all "
        f"(the sum of every run's time; this invocation took {minutes:.0f} min, reusing the runs it found cached). "
        f"Pretraining: {s['pretrain_epochs']} epochs on "
        f"{s['pretrain_images']} Fashion-MNIST training images (ResNet-18, {s['image_size']} px, neck and tile head "
        f"{s['width']} channels; otherwise the library's CPU recipe: batch 64, LARS for MCL, SGD for supervised; "
        f"extra overrides: {list(s.get('pretrain_overrides', [])) or 'none'}). "
        + (semantic_clause(s) if semantic else detection_clause(s))
        + "SGD with "
        + (
            f"the lr picked per row from {list(s['lrs'])} by {TASK_METRICS[s.get('task', 'detection')][0]} on a "
            f"held-out {s['heldout_fraction']:.0%} of the training canvases (seed 0), then "
            if len(s["lrs"]) > 1
            else f"lr {s['lrs'][0]:g} for every row, "
        )
        + f"{s['pretrain_seeds']} pretraining seeds per pretrained row, each fine-tuned with {s['seeds']} seeds at "
        f"that lr (random init: {s['pretrain_seeds'] * s['seeds']} seeds, each its own initialisation) on all "
        f"training canvases, evaluated on {s['val_canvases']} "
        f"validation canvases (items of Fashion-MNIST's test split). {evaluated}",
        "",
        statistics_text(s, pixels, TASK_METRICS[s.get("task", "detection")][0]),
    ]


def detection_clause(s: dict[str, Any]) -> str:
    """What the detector fine-tunes on and how its RoIs pool."""
    # The fine-tuning overrides beyond the frozen stages, which the text names on their own.
    extra_finetune = [o for o in s["finetune_overrides"] if not o.startswith("model.frozen_stages=")]
    c4 = s["arch"] in C4_ARCHITECTURES
    return (
        f"Fine-tuning {ARCH_NAMES[s['arch']]} (`model.arch={s['arch']}`): "
        f"{(FROZEN_C4 if c4 else FROZEN)[s['frozen_stages']]}; {s['finetune_epochs']} epochs, batch {s['batch_size']}, "
        f"on {s['train_canvases']} canvases of "
        f"{s['canvas']} px (items of Fashion-MNIST's training split), RoIs pooled by "
        + (
            f"{s['roi_pool_size']}x{s['roi_pool_size']} RoIAlign on C4 (stride 16; {s['rois']} RoIs sampled per "
            "image), "
            if c4
            else f"{ROI_LEVELS[s.get('roi_levels', 'torchvision')]}, "
        )
        + (f"extra overrides {extra_finetune}, " if extra_finetune else "")
    )


def semantic_clause(s: dict[str, Any]) -> str:
    """What the segmenter is and what it fine-tunes on."""
    extra_finetune = [o for o in s["finetune_overrides"] if not o.startswith("model.frozen_stages=")]
    frozen = FROZEN[s["frozen_stages"]].replace("FPN, RPN and box head trained", "FPN and head trained")
    return (
        f"Fine-tuning a semantic-FPN segmenter (`mcl-finetune task=semantic model.arch={SEMANTIC_ARCH}`: the "
        f"pretrained ResNet and FPN, a head of {s['width']} channels fusing P2..P5 at stride 4, per-pixel "
        "cross-entropy; labels: each object's visible mask as its category, background elsewhere): "
        f"{frozen}; {s['finetune_epochs']} epochs, batch {s['batch_size']}, on {s['train_canvases']} canvases of "
        f"{s['canvas']} px (items of Fashion-MNIST's training split), "
        + (f"extra overrides {extra_finetune}, " if extra_finetune else "")
    )


def statistics_text(s: dict[str, Any], pixels: dict, metric: str) -> str:
    """How a row's ``metric`` and its verdict are computed, and what the frozen probes are."""
    return (
        f"A row's {metric} is the mean over its pretraining seeds of each pretraining's mean over its fine-tuning "
        "seeds, "
        f"± the standard deviation of those per-pretraining means (random init: ± the std over its seeds); *{metric} "
        "per pretraining* lists the per-pretraining means (random init: its seeds). *vs random init* is the gap of "
        "the means with twice its nested standard error (per side, the std of the per-pretraining means over "
        "sqrt(pretraining seeds), which holds the pretraining spread; random init's: the std over its seeds over "
        "sqrt(seeds)), and a row is called better or worse only when the gap exceeds it, and only with 2 "
        "pretraining seeds or more. kNN, linear and object top-1 are means ± std over pretraining seeds. Pretrain "
        "and fine-tune minutes are per run (the fine-tuning's: the mean of the row's runs, the grid's included), "
        f"each measured beside {s['jobs'] - 1} other run{'s' if s['jobs'] > 2 else ''} when the benchmark ran "
        f"{s['jobs']} at a time. "
        "kNN and linear top-1: frozen pooled C5 on "
        f"{s['probe_images'][1]} Fashion-MNIST test images ({s['probe_images'][0]} training images as bank and probe "
        f"training set); the normalised pixels themselves give {pixels['knn_top1']:.1f} and "
        f"{pixels['linear_top1']:.1f}. *Objects*: linear top-1 on the validation canvases' objects from the frozen "
        "backbone (`mcl.detection.probe`), *in place* (C3-C5 pooled over each box of the whole canvas: what the "
        "detector starts from), *centred* (the box alone at the centre of an empty canvas, pooled C5) and *moved* "
        "(alone at a random place)."
    )


def fine_tune_minutes(pretrainings: list[dict], s: dict[str, Any]) -> float:
    """Minutes per fine-tuning run of a row: its runs and its held-out grid runs (none with one lr)."""
    all_runs = [run for p in pretrainings for run in p["runs"]]
    grid_runs = len(s["lrs"]) if len(s["lrs"]) > 1 else 0
    grid_s = sum(p["grid_s"] for p in pretrainings)
    return (grid_s + sum(run["seconds"] for run in all_runs)) / 60 / (len(all_runs) + grid_runs)


def main_table(results: dict[str, dict], s: dict[str, Any]) -> list[str]:
    """One line per row: frozen probes, lr, the task's metric with its seeds and its gap to random init, its secondary
    metrics, minutes."""
    metric, secondary = TASK_METRICS[s.get("task", "detection")]
    masks = s["arch"] in MASK_ARCHITECTURES
    header = ["pretraining", "kNN top-1", "linear top-1", "objects in place", "objects centred", "objects moved"]
    header += ["lr", metric, f"{metric} per pretraining", *(SECONDARY_NAMES[n] for n in secondary), "vs random init"]
    header += ["mask AP", "mask vs random init"] if masks else []
    header += ["pretrain min", "fine-tune min"]
    aligns = ["---"] + ["---:"] * (8 + len(secondary)) + ["---"] + (["---:", "---"] if masks else []) + ["---:"] * 2
    lines = []
    for row, result in results.items():
        pretrainings = result["pretrainings"]
        row_groups = groups(result, metric)
        per_pretraining = row_groups if len(pretrainings) > 1 else [[value] for value in row_groups[0]]
        objects = [
            frozen_cell(result, f"objects_{place}_top1") if f"objects_{place}_top1" in pretrainings[0] else "-"
            for place in PLACES
        ]
        cells = [row, frozen_cell(result, "knn_top1"), frozen_cell(result, "linear_top1"), *objects]
        cells += [f"{pretrainings[0]['lr']:g}", pm(pooled(result, metric))]
        cells += [" / ".join(f"{mean_std(group)[0]:.1f}" for group in per_pretraining)]
        cells += [pm(pooled(result, name)) for name in secondary] + [against_baseline(results, row, metric)]
        cells += [pm(pooled(result, "mask_AP")), against_baseline(results, row, "mask_AP")] if masks else []
        pre = f"{mean_std([p['pretrain_s'] / 60 for p in pretrainings])[0]:.1f}" if row != BASELINE else "-"
        lines.append(cells + [pre, f"{fine_tune_minutes(pretrainings, s):.1f}"])
    return table(header, lines, aligns)


def scale_table(results: dict[str, dict]) -> list[str]:
    scales = ["APs3", "APm3", "APl3", "APs", "APm", "APl"]
    intro = "By object size: the objects' own area thirds (APs3/APm3/APl3) and COCO's 32²/96² ranges (APs/APm/APl), "
    lines = [intro + "means and spreads as AP's:", ""]
    rows = [[row] + [pm(pooled(result, stat)) for stat in scales] for row, result in results.items()]
    return lines + table(["pretraining", *scales], rows)


def class_table(results: dict[str, dict]) -> list[str]:
    """IoU of each class (``val/IoU/<class>``), means and spreads as mIoU's."""
    first = results[BASELINE]["pretrainings"][0]["runs"][0]
    classes = [name.removeprefix("val/IoU/") for name in first if name.startswith("val/IoU/")]
    rows = [[row] + [pm(pooled(result, f"IoU/{name}")) for name in classes] for row, result in results.items()]
    return ["By class: IoU, means and spreads as mIoU's:", "", *table(["pretraining", *classes], rows)]


def seed_table(results: dict[str, dict], metric: str = "AP") -> list[str]:
    """Each pretraining seed of the rows with more than one (none when no row has)."""
    repeated = [(row, r) for row, r in results.items() if len(r["pretrainings"]) > 1]
    if not repeated:
        return []
    header = ["pretraining", "seed", "kNN top-1", "linear top-1", metric, f"{metric} per fine-tuning seed"]
    rows = [
        [row, str(p["seed"]), f"{p['knn_top1']:.1f}", f"{p['linear_top1']:.1f}", pm(mean_std(values))]
        + [" / ".join(f"{value:.1f}" for value in values), f"{p['pretrain_s'] / 60:.1f}"]
        for row, result in repeated
        for p, values in zip(result["pretrainings"], groups(result, metric), strict=True)
    ]
    intro = f"Each pretraining seed ({metric}: mean ± std over its fine-tuning seeds):"
    return ["", intro, "", *table([*header, "pretrain min"], rows)]


def lr_table(results: dict[str, dict], lrs: list[float], metric: str = "AP") -> list[str]:
    """Held-out ``metric`` per learning rate of the grid (none with one lr)."""
    if len(lrs) < 2:
        return []
    rows = [
        [row] + [f"{result['pretrainings'][0][heldout_key(metric)][f'{lr:g}']:.1f}" for lr in lrs]
        for row, result in results.items()
    ]
    intro = f"Held-out {metric} (the first pretraining, fine-tuning seed 0) for each learning rate of the grid:"
    return ["", intro, "", *table(["pretraining"] + [f"lr {lr:g}" for lr in lrs], rows)]


def weights_table(results: dict[str, dict], c4: bool) -> list[str]:
    """Each part's weight norm at the start of fine-tuning against random init's, and how far fine-tuning moved it."""
    reference = results[BASELINE]["pretrainings"][0]["runs"][0]["weights"]
    parts = list(reference)
    rows = []
    for row, result in results.items():
        weights = result["pretrainings"][0]["runs"][0]["weights"]
        rows.append([row] + [
            f"{weights[p]['norm_start'] / reference[p]['norm_start']:.2f} ({100 * weights[p]['relative_move']:.1f})"
            for p in parts
        ])  # fmt: skip
    intro = (
        "Weights (the first pretraining, fine-tuning seed 0): norm of the conv/linear weights of each part when "
        "fine-tuning starts, as a multiple of the random initialisation's, and in brackets how far fine-tuning moved "
        "them (`||w_end - w_start|| / ||w_start||`, in %). A conv followed by BatchNorm is scale-invariant: its "
        "effective step is lr / ||w||², so weights k times larger move k² times less for the same lr."
        + (" The C4 detector's box_head is the ResNet's res5." if c4 else "")
    )
    return ["", intro, "", *table(["pretraining", *parts], rows)]


def markdown(
    results: dict[str, dict], s: dict[str, Any], name: str, spread: dict, ranges, minutes: float, pixels: dict
) -> str:
    """``transfer.md``: what produced it, the main table, then the metric by object size (detection) or by class
    (segmentation), by pretraining seed, by lr of the grid, and the weights' norms."""
    metric = TASK_METRICS[s.get("task", "detection")][0]
    lines = protocol_text(results, s, name, spread, ranges, minutes, pixels) + ["", *main_table(results, s), ""]
    lines += class_table(results) if s.get("task") == "semantic" else scale_table(results)
    lines += seed_table(results, metric) + lr_table(results, list(s["lrs"]), metric)
    lines += weights_table(results, s["arch"] in C4_ARCHITECTURES)
    return "\n".join(lines) + "\n"


# The paper's claims this benchmark can test: (label, claim, row, baseline, how a "better" verdict reads).
CLAIMS = (
    ("a", "3 levels beat 1 level: the montage pretext helps dense transfer", "MCL, 3 levels", "MCL, 1 level"),
    ("b", "MCL beats random initialisation", "MCL, 3 levels", BASELINE),
    ("c", "supervised multi-level beats plain supervised (pretext/downstream alignment, appendix Fig. 4)",
     "supervised multi-level", "supervised"),
)  # fmt: skip
SIMILAR = ("d", "supervised multi-level performs similarly to MCL", "supervised multi-level", "MCL, 3 levels")
# Fig. 6: the AP gain of MCL over its supervised counterpart grows with the IoU threshold.
IOU_CLAIM = ("e", "the gain of MCL grows with the IoU threshold (Fig. 6)", "MCL, 3 levels", ("supervised", BASELINE))


def load_cost(path: Path) -> dict[str, Any] | None:
    """``make bench``'s figures (``benchmarks/results/cost.json``), or None when it has not run."""
    return json.loads(path.read_text()) if path.is_file() else None


def cost_claim(cost: dict[str, Any] | None) -> list[str]:
    """Claim (f): the 3-level online network costs about 1.31x one level (B, B/4, B/16 images per level)."""
    if cost is None:
        return [
            "| f | 3-level online cost is about 1.31x one level | - | `make bench` has not run | - | not measured |"
        ]
    cells = []
    for setting in cost["settings"]:
        row = next((r for r in setting["rows"] if r["levels"] == 3), None)
        if row is None:
            continue
        time_ratio = row.get("time", {}).get("ratio")
        cells.append(
            f"{setting['name']}: backbone images {row['flops']['online_backbone_ratio']:.3f}x, online FLOPs "
            f"{row['flops']['online_ratio']:.2f}x" + (f", step time {time_ratio:.2f}x" if time_ratio else "")
        )
    device = cost["environment"]["device"]
    backbone = [r["flops"]["online_backbone_ratio"] for st in cost["settings"] for r in st["rows"] if r["levels"] == 3]
    verdict = (
        "shown for the backbone's share (the count the paper makes); the whole online network (neck, head, "
        "projector and predictors run on every montage) and the step time cost more"
        if backbone and all(abs(b - 1.3125) < 0.01 for b in backbone)
        else "not shown"
    )
    return [
        f"| f | 3-level online cost is about 1.31x one level (1 + 1/4 + 1/16 = 1.3125) | - | "
        f"{'; '.join(cells)} (`make bench`, {device}, {cost['environment']['threads']} threads) | - | {verdict} |"
    ]


def claims(results: dict[str, dict], s: dict[str, Any], name: str, cost: dict[str, Any] | None) -> str:
    """The claims table: one line per claim of the paper this benchmark can test, its rows' numbers, the comparison
    and a verdict, with the rows' frozen kNN and linear top-1 beside them (linear accuracy need not follow)."""

    def frozen(row: str) -> str:
        knn, linear = (pretraining_mean(results[row], k)[0] for k in ("knn_top1", "linear_top1"))
        return f"{knn:.1f} / {linear:.1f}"

    def ap(row: str) -> str:
        return "{:.1f} ± {:.1f}".format(*pooled(results[row], "AP"))

    missing = lambda *rows: [row for row in rows if row not in results]  # noqa: E731
    lines = [
        f"# The paper's claims on the transfer benchmark ({name})",
        "",
        f"Generated by `{s['command']}` from its cached runs (`benchmarks/results/transfer"
        f"{'' if name == 'default' else '_' + name}.md` holds the protocol and every number), on {machine()}: "
        f"{s['pretrain_seeds']} pretraining seeds per pretrained row, {s['seeds']} fine-tuning seeds per pretraining. "
        "AP is the mean over pretraining seeds ± the std of the per-pretraining means; a gap is shown with twice "
        "its nested standard error (the pretraining spread included), and a claim is *shown* only when the gap "
        "exceeds it; *not shown at this scale* when it does not. kNN / linear: frozen pooled-C5 top-1 on "
        "Fashion-MNIST test images, means over pretraining seeds, kept beside the detection numbers because the "
        "paper finds that linear accuracy need not follow dense transfer.",
        "",
        "| claim | the paper says | row vs baseline | measured (AP) | gap ± 2 SE | verdict | kNN / linear |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, text, row, baseline in CLAIMS:
        if missing(row, baseline):
            lines.append(
                f"| {label} | {text} | {row} vs {baseline} | rows {missing(row, baseline)} not run | - | - | - |"
            )
            continue
        c = versus(results, row, baseline, "AP")
        verdict = {"better": "shown", "worse": "contradicted at this scale"}.get(
            c["verdict"], "not shown at this scale"
        )
        lines.append(
            f"| {label} | {text} | {row} vs {baseline} | {ap(row)} vs {ap(baseline)} | "
            f"{c['gap']:+.1f} ± {c['two_se']:.1f} | {verdict} | {frozen(row)} vs {frozen(baseline)} |"
        )
    label, text, row, baseline = SIMILAR
    if missing(row, baseline):
        lines.append(f"| {label} | {text} | {row} vs {baseline} | rows {missing(row, baseline)} not run | - | - | - |")
    else:
        c = versus(results, row, baseline, "AP")
        verdict = (
            f"consistent at this scale: the gap is within noise (it is not shown to be smaller than "
            f"{abs(c['gap']) + c['two_se']:.1f} AP)"
            if c["verdict"] == "within noise"
            else f"not shown: supervised multi-level is {c['verdict']} beyond noise"
        )
        lines.append(
            f"| {label} | {text} | {row} vs {baseline} | {ap(row)} vs {ap(baseline)} | "
            f"{c['gap']:+.1f} ± {c['two_se']:.1f} | {verdict} | {frozen(row)} vs {frozen(baseline)} |"
        )
    label, text, row, baselines = IOU_CLAIM
    for baseline in baselines:
        if missing(row, baseline):
            lines.append(
                f"| {label} | {text} | {row} vs {baseline} | rows {missing(row, baseline)} not run | - | - | - |"
            )
            continue
        # The gain at IoU 0.75 minus the gain at IoU 0.5: a comparison of each run's AP75 - AP50.
        c = versus(results, row, baseline, lambda run: run["val/AP75"] - run["val/AP50"])
        gains = [pooled(results[row], stat)[0] - pooled(results[baseline], stat)[0] for stat in ("AP50", "AP75")]
        verdict = {"better": "shown", "worse": "contradicted at this scale"}.get(
            c["verdict"], "not shown at this scale"
        )
        if c["verdict"] == "better" and gains[1] <= 0:
            # Below the baseline at both thresholds, a gap that shrinks as every AP falls toward 0 is no gain.
            verdict = (
                "not shown: no gain at either threshold; the deficit narrows as every AP falls toward 0 at high IoU"
            )
        paper = " (the paper's baseline)" if baseline == "supervised" else ""
        lines.append(
            f"| {label} | {text} | {row} vs {baseline}{paper} | gain at IoU 0.5 {gains[0]:+.1f}, at 0.75 "
            f"{gains[1]:+.1f} | {c['gap']:+.1f} ± {c['two_se']:.1f} (gain at 0.75 minus gain at 0.5) | {verdict} | "
            f"{frozen(row)} vs {frozen(baseline)} |"
        )
    lines += cost_claim(cost)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    for name in ("quick", "full", "large"):
        group.add_argument(f"--{name}", action="store_true", help=f"the {name!r} settings (see SETTINGS)")
    parser.add_argument("--seeds", type=int, help="fine-tuning seeds per pretraining (default: the settings')")
    parser.add_argument("--pretrain-seeds", type=int, help="pretraining seeds per pretrained row (default: settings')")
    parser.add_argument(
        "--jobs", type=int,
        help="runs at a time, each in its own process with cores/jobs torch threads (default: 2 on 2+ CPU cores, "
        "1 on a GPU)",
    )  # fmt: skip
    parser.add_argument(
        "--rows",
        help="rows instead of the settings', joined by ',' (random init is always run): 'supervised,MCL, 1 level'",
    )
    parser.add_argument("--lrs", help="comma-separated learning-rate grid instead of the settings' (one: no grid)")
    parser.add_argument(
        "--roi-levels", choices=("torchvision", "pretraining"), default="torchvision",
        help="RoI-to-level mapping: torchvision's (224 px on P4) or the pretraining's (view size on P5)",
    )  # fmt: skip
    parser.add_argument(
        "--arch", choices=ARCHITECTURES, default=DEFAULT_ARCH,
        help="the detector every row fine-tunes (mcl-finetune's model.arch; default: Faster R-CNN R18-FPN v2)",
    )  # fmt: skip
    parser.add_argument(
        "--task", choices=tuple(TASK_METRICS), default="detection",
        help="what every row fine-tunes for: detection (--arch) or semantic segmentation (a semantic-FPN segmenter)",
    )  # fmt: skip
    parser.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs instead of the settings'")
    parser.add_argument(
        "--pretrain-override", action="append", default=[], metavar="KEY=VALUE",
        help="an extra mcl-train override for every pretraining (repeatable), e.g. data.zoom_out=3",
    )  # fmt: skip
    parser.add_argument(
        "--frozen-stages",
        type=int,
        choices=range(6),
        metavar="N",
        help="backbone stages kept frozen in fine-tuning (detectron2's FREEZE_AT; default: the settings', 5 = all; "
        "4 for the C4 detectors, whose res5 is the RoI head)",
    )
    parser.add_argument(
        "--finetune-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra mcl-finetune override for every fine-tuning (repeatable), e.g. model.anchor_base_size=8",
    )
    parser.add_argument("--tag", help="results go to transfer_<tag>.md/.json/.png instead of the settings' name")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where runs are cached (benchmarks/runs)")
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="where tables and plots go")
    parser.add_argument(
        "--cost", type=Path, default=ROOT / "results" / "cost.json",
        help="make bench's cost figures, for the claims table's cost line (benchmarks/results/cost.json)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    name = next((n for n in ("quick", "full", "large") if getattr(args, n)), "default")
    shown = [
        arg
        for i, arg in enumerate(argv)
        if arg not in ("--runs", "--results", "--cost")
        and argv[i - 1 : i] not in (["--runs"], ["--results"], ["--cost"])
    ]
    s = dict(SETTINGS[name])
    s["command"] = shlex.join(["python", "benchmarks/transfer.py", *shown])
    s["runs"] = args.runs
    if args.seeds:
        s["seeds"] = args.seeds
    if args.pretrain_seeds:
        s["pretrain_seeds"] = args.pretrain_seeds
    cores = os.cpu_count() or 1
    s["jobs"] = args.jobs or (min(2, cores) if s["accelerator"] == "cpu" else 1)
    if s["jobs"] < 1:
        parser.error(f"--jobs {s['jobs']}: at least 1")
    if args.rows:
        rows = [row.strip() for row in re.split(r",(?! )", args.rows)]  # row names hold ", "
        unknown = [row for row in rows if row not in ROWS]
        if unknown:
            parser.error(f"unknown rows {unknown}: use some of {list(ROWS)}")
        s["rows"] = tuple(dict.fromkeys([BASELINE, *rows]))
    if args.lrs:
        s["lrs"] = tuple(float(lr) for lr in args.lrs.split(","))
    if args.finetune_epochs:
        s["finetune_epochs"] = args.finetune_epochs
    if args.pretrain_override:
        s["pretrain_overrides"] = (*s.get("pretrain_overrides", ()), *args.pretrain_override)
    semantic = args.task == "semantic"
    if semantic and (args.arch != DEFAULT_ARCH or args.roi_levels != "torchvision"):
        parser.error("--arch and --roi-levels choose the detector: --task semantic fine-tunes a semantic-FPN segmenter")
    s["task"] = args.task
    s["arch"] = SEMANTIC_ARCH if semantic else args.arch
    if args.frozen_stages is not None:
        s["frozen_stages"] = args.frozen_stages
    elif args.arch in C4_ARCHITECTURES and s["frozen_stages"] == 5:
        s["frozen_stages"] = 4  # the representation frozen (up to C4), the detector's heads (res5 included) trained
    if args.arch in C4_ARCHITECTURES:  # detectron2's 14x14 RoIs on a GPU, the cheaper sizing on CPU cores
        cpu = s["accelerator"] == "cpu"
        s["rois"] = min(s["rois"], C4_SIZING["rois"]) if cpu else s["rois"]
        s["roi_pool_size"] = C4_SIZING["roi_pool_size"] if cpu else C4_ROI_POOL_SIZE
    if args.arch in C4_ARCHITECTURES and args.roi_levels != "torchvision":
        parser.error(f"--roi-levels {args.roi_levels} is for the FPN detectors: {args.arch} pools every RoI from C4")
    too_small = [row for row in s["rows"] if s["image_size"] < MIN_IMAGE_SIZE.get(row, 0)]
    if too_small:
        parser.error(
            f"rows {too_small} need views of at least {[MIN_IMAGE_SIZE[row] for row in too_small]} px, these "
            f"settings pretrain at {s['image_size']} px: use --large"
        )
    frozen = (f"model.frozen_stages={s['frozen_stages']}",) if s["frozen_stages"] else ()
    s["finetune_overrides"] = (*frozen, *args.finetune_override)
    s["roi_levels"] = args.roi_levels
    started = time.perf_counter()
    log = lambda message: print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {message}", flush=True)  # noqa: E731
    canvas_settings = {k: s[k] for k in ("canvas", "train_canvases", "val_canvases", "heldout_fraction")}
    root = args.runs / f"canvases_{key(canvas_settings)}"
    spec = CanvasSpec(canvas_size=s["canvas"], min_side=8, max_side=s["canvas"] * 3 // 4)
    if not (root / "annotations" / "heldout.json").is_file():
        build_fashion_canvas(root, s["train_canvases"], s["val_canvases"], seed=0, spec=spec)
        split_annotations(root / "annotations" / "train.json", s["heldout_fraction"], root / "annotations", seed=0)
    data = {
        "root": root,
        "train": root / "annotations" / "train.json",
        "fit": root / "annotations" / "fit.json",
        "heldout": root / "annotations" / "heldout.json",
        "val": root / "annotations" / "val.json",
        "train_images": root / "train",
        "val_images": root / "val",
    }
    runner = Runner(s["jobs"], max(1, cores // s["jobs"]))
    failed = True
    try:
        pixels_job = runner.submit(probe, "pixels", 0, None, s, None, True)
        results = runner.map_rows(lambda row: run_row(row, data, s, log, runner), s["rows"])
        pixels = pixels_job.result()
        failed = False
    finally:
        runner.close(cancel=failed)
    first_run = results[BASELINE]["pretrainings"][0]["runs"][0]
    spread = object_scale_spread(data["val"])
    minutes = (time.perf_counter() - started) / 60
    if args.tag:
        name = args.tag
    elif semantic:
        name = "semantic" if name == "default" else f"{name}_semantic"
    table = markdown(results, s, name, spread, first_run.get("area_ranges"), minutes, pixels)
    suffix = "" if name == "default" else f"_{name}"
    results_dir = args.results
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"transfer{suffix}.md").write_text(table)
    settings = {k: v for k, v in s.items() if k != "runs"}
    summary = {"settings": settings, "minutes": minutes, "run_minutes": run_minutes(results, pixels)}
    summary.update({"spread": spread, "pixel_probe": pixels, "rows": results})
    (results_dir / f"transfer{suffix}.json").write_text(json.dumps(summary, indent=1, default=str))
    if semantic:  # the claims and the AP-by-IoU curves are detection's
        print(table)
        log("done")
        return
    (results_dir / f"claims{suffix}.md").write_text(claims(results, s, name, load_cost(args.cost)))
    curves = {
        row: [{float(t): ap for t, ap in run["ap_by_iou"].items()} for p in r["pretrainings"] for run in p["runs"]]
        for row, r in results.items()
    }
    plot_ap_by_iou_seeds(curves, BASELINE, results_dir / f"transfer_ap_by_iou{suffix}.png")
    plot_scale_spread({"canvas train": data["train"]}, results_dir / f"transfer_scale_spread{suffix}.png")
    print(table)
    log("done")


if __name__ == "__main__":
    main()
