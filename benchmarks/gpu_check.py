"""GPU acceptance check: everything a first GPU session must measure, in one command of at most 8 minutes.

Run with ``make gpu-check`` (``.venv/bin/python -m benchmarks.gpu_check``) on a machine with one CUDA card; ``--quick``
runs every part at tiny sizes on the CPU (the test suite does, so the script keeps working until a GPU comes).
``benchmarks/README.md`` explains the figures. Results go to ``benchmarks/results/gpu_check.{json,md}``
(``gpu_check_quick.{json,md}`` with ``--quick``). The parts, each run on its own (a failing part is recorded with its
error and the next one runs; the exit status is 1 when any part failed):

1. ``environment``: card, versions, the card's dense bf16 peak, ``cudnn.benchmark`` as the library's Trainer leaves it.
2. ``device_views``: ms per batch of :class:`mcl.data.device.DeviceViews` on padded random sources, 3 levels.
3. ``host_syncs``: host syncs (:class:`mcl.hostsync.CountHostSyncs`; on CUDA also ``set_sync_debug_mode("warn")``
   warnings) and kernel launches (``torch.profiler``) per step of the Lightning loop, both methods, both view paths.
4. ``bare_step``: ``cost.py``'s training step (``speed_options.py``'s variants of it): images/s, model FLOP
   utilisation and peak memory of the default model, ``channels_last`` and ``compile``.
5. ``precision``: the loss of one batch in fp32 and under bf16 autocast; the EMA update against its formula.
6. ``lightning_run``: ``mcl.train.train`` for a few dozen steps with device views and kNN validation, then a resume
   from its ``last.ckpt``: steady ms/step, overhead over the bare step, kNN top-1, the resumed step.
7. ``two_process``: two processes on the one card (gloo), SyncBatchNorm, DDP and ``compile``: no hang, and the same
   parameters on both ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table
from torch import nn
from torch._dynamo.utils import counters as dynamo_counters
from torch.autograd import DeviceType
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.cost import add_device_option, check_device, clock
from benchmarks.speed_options import VARIANTS, Runner
from mcl.checkpoints import LAST, load_checkpoint
from mcl.data.datamodules import MultiLevelDataModule
from mcl.data.device import collate_sources
from mcl.hostsync import CountHostSyncs
from mcl.methods import MCL
from mcl.runtime import CONFIG_DIR, instantiate_trainer
from mcl.train import train

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LEVELS = 3
# Dense bf16 tensor-core peaks (no sparsity; vendors' data sheets), matched by fragments of the name CUDA reports, the
# first match winning. An H100 that is neither PCIe nor NVL is taken for the SXM part ("NVIDIA H100 80GB HBM3").
PEAK_BF16_DENSE = (
    (("H100", "PCIe"), 756e12, "H100 PCIe"),
    (("H100",), 989e12, "H100 SXM"),
    (("H200",), 989e12, "H200"),
    (("A100",), 312e12, "A100"),
    (("L40S",), 362e12, "L40S"),
)
# The sources of part 2: about ImageNet's mean photo, landscape (height, width) or, for a quarter of them, portrait.
SOURCE_SIZE = (375, 500)
EMA_MOMENTUM = 0.99
# What the profiler calls a kernel launch on the host: runtime and driver API calls (inductor's kernels use the latter).
LAUNCH_CALLS = {
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaLaunchCooperativeKernel",
    "cudaGraphLaunch",
}
SYNC_WARNING = "synchronizing CUDA operation"


@dataclass(frozen=True)
class Plan:
    """Sizes of every part: the GPU run's, or ``--quick``'s tiny ones."""

    backbone: str
    image_size: int
    batch: int
    source_scale: float  # of SOURCE_SIZE
    views_warmup: int
    views_repeats: int
    sync_batch: int
    sync_skip: int  # Lightning steps before host syncs are counted (the first ones build things once)
    sync_steps: int
    loader_workers: int
    step_warmup: int
    step_repeats: int
    compile_warmup: int
    run_steps: int
    run_warmup: int  # Lightning steps before the steady timing window
    resume_steps: int
    ddp_image_size: int
    ddp_batch: int
    ddp_steps: int
    ddp_timeout_s: int
    compile_backend: str


# Sized for at most 8 minutes on one H100 or H200 with an empty inductor cache, most of it compiling (parts 4 and 7);
# an estimate until the first GPU run.
GPU_PLAN = Plan(
    backbone="resnet50",
    image_size=224,
    batch=128,
    source_scale=1.0,
    views_warmup=3,
    views_repeats=10,
    sync_batch=64,
    sync_skip=1,
    sync_steps=3,
    loader_workers=8,
    step_warmup=3,
    step_repeats=10,
    compile_warmup=3,
    run_steps=30,
    run_warmup=10,
    resume_steps=5,
    ddp_image_size=64,
    ddp_batch=32,
    ddp_steps=5,
    ddp_timeout_s=240,
    compile_backend="inductor",
)
# Every part at tiny sizes (32 px views, as the transfer benchmark's pretraining): about 1 minute on 2 CPU cores.
QUICK_PLAN = Plan(
    backbone="resnet18",
    image_size=32,
    batch=8,
    source_scale=32 / 224,
    views_warmup=1,
    views_repeats=2,
    sync_batch=8,
    sync_skip=1,
    sync_steps=2,
    loader_workers=0,
    step_warmup=1,
    step_repeats=2,
    compile_warmup=1,
    run_steps=4,
    run_warmup=1,
    resume_steps=2,
    ddp_image_size=32,
    ddp_batch=8,
    ddp_steps=2,
    ddp_timeout_s=240,
    compile_backend="eager",
)


@dataclass
class Context:
    """What every part gets: the plan, the device and a scratch folder."""

    plan: Plan
    device: torch.device
    workdir: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def peak_bf16(card: str) -> tuple[float | None, str]:
    """The card's dense bf16 peak FLOP/s and the table row it matched, or ``None`` and why."""
    if "NVL" in card:
        return None, f"unknown card {card!r}: NVL parts are not in the table"
    for fragments, peak, row in PEAK_BF16_DENSE:
        if all(fragment in card for fragment in fragments):
            return peak, row
    return None, f"unknown card {card!r}: not in the table, so no FLOP utilisation"


def card_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """``train.yaml`` composed with ``overrides``, as ``mcl-train`` would, writing to ``output_dir``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return cfg


def run_overrides(context: Context, method: str, augment_on: str, batch: int, steps: int, epochs: int = 1) -> list[str]:
    """A synthetic-data run at the plan's model size: ``epochs`` epochs of ``steps`` batches each."""
    plan = context.plan
    method_keys = ["method.num_classes=4"] if method == "supervised" else []  # synthetic data has 4 classes
    return [
        f"method={method}",
        *method_keys,
        "data=synthetic",
        f"backbone={plan.backbone}",
        f"image_size={plan.image_size}",
        f"batch_size={batch}",
        f"levels={LEVELS}",
        f"data.augment_on={augment_on}",
        f"data.num_train={batch * steps}",
        "data.train_size=null",
        f"data.num_workers={plan.loader_workers}",
        f"trainer={'gpu' if context.cuda else 'cpu'}",
        f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "validate_at_init=false",
    ]


# ------------------------------------------------------------------------------------------------ 1. environment
def environment(context: Context) -> dict[str, Any]:
    """Card, versions, the card's dense bf16 peak, and ``cudnn.benchmark`` once the library's Trainer is built."""
    card = card_name(context.device)
    figures: dict[str, Any] = {
        "card": card,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "lightning": pl.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "not_measured": {},
    }
    if card is None:
        figures["peak_bf16_tflops"] = None
        figures["not_measured"]["peak_bf16_tflops"] = "no CUDA card"
        figures["card"] = f"cpu ({platform.processor() or platform.machine()})"
    else:
        peak, row = peak_bf16(card)
        properties = torch.cuda.get_device_properties(context.device)
        figures.update(
            peak_bf16_tflops=peak / 1e12 if peak else None,
            peak_row=row,
            memory_gib=properties.total_memory / 2**30,
            multiprocessors=properties.multi_processor_count,
        )
        if peak is None:
            figures["not_measured"]["peak_bf16_tflops"] = row
    trainer_name = "gpu" if context.cuda else "cpu"
    cfg = compose_train([f"trainer={trainer_name}", "logger=none"], context.workdir / "trainer")
    trainer = instantiate_trainer(cfg)
    figures.update(
        trainer_config=trainer_name,
        trainer_precision=str(cfg.trainer.precision),
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        matmul_precision=torch.get_float32_matmul_precision(),
    )
    del trainer
    return figures


# ----------------------------------------------------------------------------------------------- 2. device views
def random_sources(count: int, scale: float, generator: torch.Generator) -> list[torch.Tensor]:
    """``count`` random uint8 ``(3, h, w)`` images about ``SOURCE_SIZE`` x ``scale`` (a quarter portrait), each side
    drawn within 80..100% of it."""
    images = []
    for _ in range(count):
        height, width = (
            round(side * scale * (0.8 + 0.2 * float(torch.rand(1, generator=generator)))) for side in SOURCE_SIZE
        )
        if float(torch.rand(1, generator=generator)) < 0.25:
            height, width = width, height
        images.append(torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator))
    return images


def device_views(context: Context) -> dict[str, Any]:
    """Milliseconds per batch of the library's device views (BYOL sides, 3 levels) on a padded source batch."""
    plan, device = context.plan, context.device
    generator = torch.Generator().manual_seed(0)
    batch = collate_sources([(image, 0) for image in random_sources(plan.batch, plan.source_scale, generator)])
    batch = type(batch)(*(tensor.to(device) for tensor in batch))
    views = MultiLevelDataModule(image_size=plan.image_size, views_per_side=LEVELS).make_device_views().to(device)
    seconds = []
    for index in range(plan.views_warmup + plan.views_repeats):
        start = clock(device)
        output = views(batch)
        elapsed = clock(device) - start
        if index >= plan.views_warmup:
            seconds.append(elapsed)
    median = statistics.median(seconds)
    return {
        "batch": plan.batch,
        "padded_sources": f"{tuple(batch.images.shape)} uint8",
        "views": f"{tuple(output.shape)}",
        "ms_per_batch": 1000 * median,
        "ms_per_batch_min": 1000 * min(seconds),
        "source_images_per_s": plan.batch / median,
        "repeats": len(seconds),
    }


# -------------------------------------------------------------------------------------------------- 3. host syncs
class StepWindow(pl.Callback):
    """Steps ``skip + 1 .. max_steps`` of a run, as :class:`CountHostSyncs` windows them (from the end of one training
    batch to the end of the next): :meth:`open` at the end of step ``skip``, :meth:`step` at the end of every step
    inside, :meth:`close` at the end of the last."""

    def __init__(self, skip: int):
        self.skip = skip
        self.active = False

    def open(self) -> None: ...

    def step(self) -> None: ...

    def close(self) -> None: ...

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.active:
            self.step()
        if trainer.global_step == self.skip:
            self.active = True
            self.open()
        elif self.active and trainer.global_step >= trainer.max_steps:
            self.end()

    def end(self) -> None:
        if self.active:
            self.active = False
            self.close()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.end()


class SyncWarnings(StepWindow):
    """CUDA's own count of host syncs: ``torch.cuda.set_sync_debug_mode("warn")`` warnings per step."""

    def __init__(self, skip: int):
        super().__init__(skip)
        self.per_step: list[int] = []
        self._catcher: contextlib.AbstractContextManager | None = None
        self._log: list[warnings.WarningMessage] = []
        self._seen = 0

    def open(self) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self._log = self._catcher.__enter__()
        warnings.simplefilter("always")
        self._seen = 0
        torch.cuda.set_sync_debug_mode("warn")

    def step(self) -> None:
        new = self._log[self._seen :]
        self._seen = len(self._log)
        self.per_step.append(sum(SYNC_WARNING in str(message.message) for message in new))

    def close(self) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._catcher.__exit__(None, None, None)


class LaunchProfile(StepWindow):
    """``torch.profiler`` over the window: kernel launches (host API calls), GPU kernels and aten ops per step."""

    def __init__(self, skip: int, cuda: bool):
        super().__init__(skip)
        self.cuda = cuda
        self.steps = 0
        self.counts: dict[str, float] = {}
        self._profile: torch.profiler.profile | None = None

    def open(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profile = torch.profiler.profile(activities=activities)
        self._profile.__enter__()

    def step(self) -> None:
        self.steps += 1

    def close(self) -> None:
        self._profile.__exit__(None, None, None)
        # Kineto's raw events, counted by name: key_averages() would first build a Python event per record (seconds
        # per run on the CPU; its counts differ by a few ops in a thousand).
        events = self._profile.profiler.kineto_results.events()
        names = Counter(event.name() for event in events)
        kernels = sum(
            event.device_type() == DeviceType.CUDA and not event.name().startswith(("Memcpy", "Memset"))
            for event in events
        )
        steps = max(1, self.steps)
        self.counts = {
            "kernel_launches_per_step": sum(names[call] for call in LAUNCH_CALLS) / steps,
            "gpu_kernels_per_step": kernels / steps,
            "aten_ops_per_step": sum(count for name, count in names.items() if name.startswith("aten::")) / steps,
        }


def per_step(counter: Counter, steps: int) -> dict[str, float]:
    return {key: count / steps for key, count in counter.most_common()}


def count_syncs(context: Context, method: str, augment_on: str) -> dict[str, Any]:
    """One Lightning run (the library's module, datamodule and configured Trainer, no validation or checkpoints) with
    host syncs counted and kernel launches profiled over the same steps."""
    plan = context.plan
    steps = plan.sync_skip + plan.sync_steps
    overrides = [*run_overrides(context, method, augment_on, plan.sync_batch, steps), f"+trainer.max_steps={steps}"]
    cfg = compose_train(overrides, context.workdir / f"syncs_{method}_{augment_on}")
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    counter = CountHostSyncs(skip=plan.sync_skip)
    profile = LaunchProfile(plan.sync_skip, context.cuda)
    callbacks: list[pl.Callback] = [counter, profile]
    if context.cuda:
        sync_warnings = SyncWarnings(plan.sync_skip)
        callbacks.insert(1, sync_warnings)
    trainer = hydra.utils.instantiate(
        cfg.trainer, logger=False, callbacks=callbacks, enable_checkpointing=False, limit_val_batches=0
    )
    trainer.fit(model, datamodule=datamodule)
    records = counter.per_step
    if not records:
        raise RuntimeError(f"no step was counted ({steps} steps, {plan.sync_skip} skipped)")
    totals = [record.total for record in records]
    ops, places = Counter(), Counter()
    for record in records:
        ops.update(record.ops)
        places.update(record.places)
    figures: dict[str, Any] = {
        "steps_counted": len(records),
        "host_syncs_per_step": statistics.median(totals),
        "host_syncs_each_step": totals,
        "loader_ops_per_step": statistics.median(record.loader for record in records),
        "by_op": per_step(ops, len(records)),
        "by_place": per_step(places, len(records)),
        **profile.counts,
    }
    if context.cuda:
        figures["cuda_sync_warnings_per_step"] = statistics.median(sync_warnings.per_step)
        figures["cuda_sync_warnings_each_step"] = sync_warnings.per_step
    else:
        for key in ("kernel_launches_per_step", "gpu_kernels_per_step"):
            figures[key] = None
        figures["cuda_sync_warnings_per_step"] = None
    return figures


def host_syncs(context: Context) -> dict[str, Any]:
    """Host syncs and kernel launches per step for both methods and both view paths."""
    plan = context.plan
    figures: dict[str, Any] = {
        "setting": f"{plan.backbone} at {plan.image_size} px, batch {plan.sync_batch}, {LEVELS} levels, "
        f"{plan.sync_steps} steps counted after {plan.sync_skip}"
    }
    for method in ("mcl", "supervised"):
        for augment_on in ("cpu", "device"):
            figures[f"{method}_augment_on_{augment_on}"] = count_syncs(context, method, augment_on)
            release_memory(context.device)
    if not context.cuda:
        figures["not_measured"] = {
            "*.kernel_launches_per_step, *.gpu_kernels_per_step": "CUDA only (the profiler sees no kernels on a CPU)",
            "*.cuda_sync_warnings_per_step": "CUDA only (torch.cuda.set_sync_debug_mode)",
        }
    return figures


# ------------------------------------------------------------------------------------------------- 4. bare step
def step_runner(context: Context, options: dict[str, Any]) -> Runner:
    """``speed_options.py``'s runner (``cost.py``'s ``StepRunner.train_step``) for one variant at the plan's size."""
    plan = context.plan
    settings = argparse.Namespace(
        backbone=plan.backbone, image_size=plan.image_size, levels=LEVELS, batch=plan.batch, amp=context.cuda
    )
    return Runner(settings, options, context.device)


def timed_variant(context: Context, options: dict[str, Any], warmup: int) -> dict[str, Any]:
    """First step, then the median of the timed steps after ``warmup`` untimed ones, and the peak memory."""
    device, plan = context.device, context.plan
    if context.cuda:
        torch.cuda.reset_peak_memory_stats(device)
    runner = step_runner(context, options)
    seconds = [runner.step() for _ in range(warmup + plan.step_repeats)]
    median = statistics.median(seconds[warmup:])
    row = {
        "first_step_s": seconds[0],
        "ms_per_step": 1000 * median,
        "ms_per_step_min": 1000 * min(seconds[warmup:]),
        "images_per_s": plan.batch / median,
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if context.cuda else None,
    }
    del runner
    release_memory(device)
    return row


def bare_step(context: Context) -> dict[str, Any]:
    """Images/s, FLOP utilisation and peak memory of the training step: default, channels_last, compile (and, on CUDA,
    the default with ``cudnn.benchmark`` on)."""
    plan, device = context.plan, context.device
    runner = step_runner(context, VARIANTS["default"])
    with FlopCounterMode(display=False) as counter:
        runner.train_step()
    flops = counter.get_total_flops()
    del runner
    release_memory(device)
    peak, peak_row = peak_bf16(card_name(device)) if context.cuda else (None, "no CUDA card")
    figures: dict[str, Any] = {
        "setting": f"{plan.backbone} at {plan.image_size} px, batch {plan.batch}, {LEVELS} levels, "
        f"{'bf16 autocast' if context.cuda else 'fp32'}, SGD; {plan.step_repeats} timed steps",
        "gflop_per_step": flops / 1e9,
    }
    variants = {"default": (VARIANTS["default"], plan.step_warmup)}
    variants["channels_last"] = (VARIANTS["channels_last"], plan.step_warmup)
    if context.cuda:
        variants["cudnn_benchmark"] = (VARIANTS["default"], plan.step_warmup)
    variants["compile"] = ({**VARIANTS["compile"], "compile_backend": plan.compile_backend}, plan.compile_warmup)
    for name, (options, warmup) in variants.items():
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = benchmark or name == "cudnn_benchmark"
        if name == "compile":
            dynamo_counters.clear()
        try:
            row = timed_variant(context, options, warmup)
        finally:
            torch.backends.cudnn.benchmark = benchmark
        if name == "compile":
            row.update(
                compile_backend=plan.compile_backend,
                graphs=dynamo_counters["stats"]["unique_graphs"],
                graph_breaks=sum(dynamo_counters["graph_break"].values()),
            )
        row["mfu_percent"] = 100 * flops * row["images_per_s"] / plan.batch / peak if peak else None
        figures[name] = row
    not_measured = {}
    if peak is None:
        not_measured["*.mfu_percent"] = peak_row
    if not context.cuda:
        not_measured["*.peak_memory_mib"] = "CUDA only (torch.cuda.max_memory_allocated)"
        not_measured["cudnn_benchmark"] = "CUDA only"
    figures["not_measured"] = not_measured
    return figures


# ------------------------------------------------------------------------------------------------- 5. precision
def precision(context: Context) -> dict[str, Any]:
    """The loss of one batch in fp32 (TF32 off) and under bf16 autocast, same weights and montages; then the EMA
    update against ``m * target + (1 - m) * online`` computed in float64."""
    device = context.device
    runner = step_runner(context, VARIANTS["default"])
    model, views = runner.model, runner.views
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            model.seed_montages(0)
            fp32 = float(model.forward_losses(views)[0])
            model.seed_montages(0)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                bf16 = float(model.forward_losses(views)[0])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    runner.train_step()  # the online network moves away from its target
    pairs = model.momentum_pairs
    online = [p.detach().double() for module, _ in pairs for p in module.parameters()]
    before = [p.detach().double() for _, module in pairs for p in module.parameters()]
    model.update_target(EMA_MOMENTUM)
    after = [p.detach().double() for _, module in pairs for p in module.parameters()]
    eps = torch.finfo(torch.float32).eps
    max_error = max_ulps = 0.0
    for o, b, a in zip(online, before, after, strict=True):
        exact = EMA_MOMENTUM * b + (1 - EMA_MOMENTUM) * o
        error = (a - exact).abs()
        scale = torch.maximum(b.abs(), o.abs()).clamp_min(torch.finfo(torch.float32).tiny)
        max_error = max(max_error, float(error.max()))
        max_ulps = max(max_ulps, float((error / (eps * scale)).max()))
    moved = max(float((o - b).abs().max()) for o, b in zip(online, before, strict=True))
    del runner, model, views
    release_memory(device)
    return {
        "loss_fp32": fp32,
        "loss_bf16": bf16,
        "loss_relative_difference": abs(bf16 - fp32) / abs(fp32),
        "ema_momentum": EMA_MOMENTUM,
        "ema_online_target_max_gap": moved,
        "ema_max_abs_error": max_error,
        "ema_max_error_fp32_eps": max_ulps,
        "checks": {
            "losses_finite": math.isfinite(fp32) and math.isfinite(bf16),
            "ema_within_fp32_rounding": max_ulps <= 2.0 and moved > 0,
        },
    }


# --------------------------------------------------------------------------------------------- 6. lightning run
class StepTimer(pl.Callback):
    """Writes to ``path`` (JSON) the first and last global step of a run, the host's clock at the end of every training
    batch, and a window timed on the synchronised device: from the end of step ``first + warmup`` to the end of step
    ``last_step``."""

    def __init__(self, path: str, warmup: int, last_step: int):
        self.path = Path(path)
        self.warmup = warmup
        self.last_step = last_step
        self.first_step: int | None = None
        self.batch_ends: list[float] = []
        self.window: dict[int, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.first_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step in (self.first_step + self.warmup, self.last_step):
            self.window[trainer.global_step] = clock(pl_module.device)
        self.batch_ends.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {
            "first_step": self.first_step,
            "last_step": trainer.global_step,
            "batch_ends": self.batch_ends,
            "window": sorted(self.window.items()),
        }
        self.path.write_text(json.dumps(record))


def timed_train(cfg: DictConfig, timer: Path, warmup: int, last_step: int) -> tuple[dict[str, float], dict[str, Any]]:
    """``mcl.train.train`` with a :class:`StepTimer` among its callbacks: its metrics and the timer's record."""
    target = f"{StepTimer.__module__}.{StepTimer.__qualname__}"
    with open_dict(cfg):
        cfg.callbacks.gpu_check_timer = {
            "_target_": target,
            "path": str(timer),
            "warmup": warmup,
            "last_step": last_step,
        }
    metrics = train(cfg)
    return metrics, json.loads(timer.read_text())


def lightning_run(context: Context) -> dict[str, Any]:
    """An epoch of ``mcl.train.train`` (synthetic data at the plan's size, device views, csv logger, kNN validation at
    its end), then a resume from its ``last.ckpt`` for a few steps of a second epoch.

    The resume limits the second epoch with ``trainer.limit_train_batches``, not ``trainer.max_steps``: Lightning
    2.6, resuming an end-of-epoch checkpoint while ``max_steps`` is set, counts the finished epoch a second time and
    stops at ``max_epochs`` without training the next one."""
    plan, device = context.plan, context.device
    folder = context.workdir / "lightning_run"
    first_cfg = compose_train(
        [*run_overrides(context, "mcl", "device", plan.batch, plan.run_steps), "logger=csv"], folder
    )
    if context.cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timer = context.workdir / "timer_run.json"
    metrics, first = timed_train(first_cfg, timer, plan.run_warmup, plan.run_steps)
    (start_step, start), (end_step, end) = first["window"]
    last = folder / "checkpoints" / LAST
    total = plan.run_steps + plan.resume_steps
    resume = run_overrides(context, "mcl", "device", plan.batch, plan.run_steps, epochs=2)
    resume += ["logger=csv", f"+trainer.limit_train_batches={plan.resume_steps}", f"ckpt_path={last}"]
    timer = context.workdir / "timer_resume.json"
    resumed_metrics, second = timed_train(compose_train(resume, folder), timer, 0, total)
    saved_step = load_checkpoint(last, map_location="meta")["global_step"]
    ends = first["batch_ends"]
    knn = metrics.get("val/knn_top1")
    return {
        "setting": f"mcl.train.train: {plan.backbone} at {plan.image_size} px, batch {plan.batch}, {LEVELS} levels, "
        f"data=synthetic, data.augment_on=device, trainer={'gpu' if context.cuda else 'cpu'}, optimizer=lars",
        "steps": first["last_step"],
        "steady_ms_per_step": 1000 * (end - start) / (end_step - start_step),
        "steady_window_steps": f"{start_step + 1}..{end_step}",
        "median_ms_between_batch_ends": 1000 * statistics.median(b - a for a, b in pairwise(ends)),
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if context.cuda else None,
        "train_loss": metrics.get("train/loss"),
        "knn_top1": knn,
        "resume_first_step": second["first_step"],
        "resume_last_step": second["last_step"],
        "resume_checkpoint_step": saved_step,
        "resume_train_loss": resumed_metrics.get("train/loss"),
        "resume_knn_top1": resumed_metrics.get("val/knn_top1"),
        "checks": {
            "knn_top1_finite": knn is not None and math.isfinite(knn),
            "resume_continued_from_saved_step": second["first_step"] == plan.run_steps
            and second["last_step"] == saved_step == total,
        },
        **({} if context.cuda else {"not_measured": {"peak_memory_mib": "CUDA only"}}),
    }


# --------------------------------------------------------------------------------------------- 7. two processes
class TrainingLoss(nn.Module):
    """MCL's training loss as a module's ``forward``, for DDP to wrap (Lightning wraps its module alike)."""

    def __init__(self, model: MCL):
        super().__init__()
        self.model = model

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.model.forward_losses(views)[0]


def sync_batchnorm(device: torch.device) -> tuple[Callable[[nn.Module], nn.Module] | None, str]:
    """The library's SyncBatchNorm converter when there is one, else torch's (which needs a GPU: on the CPU, none)."""
    try:
        from mcl.syncbn import convert_sync_batchnorm
    except ImportError:
        if device.type != "cuda":
            return None, "none: mcl.syncbn is missing and torch.nn.SyncBatchNorm needs a GPU"
        return nn.SyncBatchNorm.convert_sync_batchnorm, "torch.nn.SyncBatchNorm.convert_sync_batchnorm"
    return convert_sync_batchnorm, "mcl.syncbn.convert_sync_batchnorm"


def plain_batchnorms(module: nn.Module) -> int:
    return sum(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in module.modules())


def two_process_worker(rank: int, port: int, plan: Plan, device_type: str, folder: str) -> None:
    """One rank: a small MCL model, SyncBatchNorm, compiled, in DDP over gloo; a few SGD steps with the EMA update;
    writes its parameters and losses to ``folder/rank{rank}.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    model = MCL(
        backbone={"name": "resnet18"},
        neck={"name": "fpn", "out_channels": 32},
        image_size=plan.ddp_image_size,
        levels=LEVELS,
        projector_hidden_dim=64,
        embedding_dim=32,
        compile=True,
        compile_backend=plan.compile_backend,
    ).to(device)
    model.compile_networks()  # before the BatchNorm conversion and DDP, as Lightning's setup("fit") does
    batchnorms = plain_batchnorms(model)
    convert, converter = sync_batchnorm(device)
    if convert is not None:
        model = convert(model)
    wrapped = nn.parallel.DistributedDataParallel(
        TrainingLoss(model), device_ids=[0] if device.type == "cuda" else None
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    size = plan.ddp_image_size
    losses = []
    for _ in range(plan.ddp_steps):
        views = torch.randn(plan.ddp_batch, 2, LEVELS, 3, size, size, generator=generator).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = wrapped(views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_target(EMA_MOMENTUM)
        losses.append(float(loss.detach()))
    parameters = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
    torch.save(
        {
            "parameters": parameters,
            "losses": losses,
            "converter": converter,
            "batchnorm_layers": batchnorms,
            "converted_layers": batchnorms - plain_batchnorms(model),
        },
        Path(folder) / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_process(context: Context) -> dict[str, Any]:
    """Two spawned ranks on the one device (gloo over 127.0.0.1): finished within the timeout, same parameters."""
    plan = context.plan
    folder = context.workdir / "two_process"
    folder.mkdir(parents=True, exist_ok=True)
    processes = mp.start_processes(
        two_process_worker,
        args=(free_port(), plan, context.device.type, str(folder)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.perf_counter() + plan.ddp_timeout_s
    finished = False
    while not finished and time.perf_counter() < deadline:
        finished = processes.join(timeout=5)
    if not finished:
        for process in processes.processes:
            if process.is_alive():
                process.kill()
        raise TimeoutError(f"the two ranks did not finish within {plan.ddp_timeout_s} s: a hang")
    ranks = [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    gap = float((ranks[0]["parameters"] - ranks[1]["parameters"]).abs().max())
    converter = ranks[0]["converter"]
    figures: dict[str, Any] = {
        "setting": f"2 processes on {context.device.type}, gloo, resnet18 at {plan.ddp_image_size} px, batch "
        f"{plan.ddp_batch} per rank, {LEVELS} levels, compile_backend={plan.compile_backend}, {plan.ddp_steps} steps",
        "sync_batchnorm_converter": converter,
        "batchnorm_layers": ranks[0]["batchnorm_layers"],
        "converted_layers": ranks[0]["converted_layers"],
        "losses_rank0": ranks[0]["losses"],
        "losses_rank1": ranks[1]["losses"],
        "parameter_max_abs_difference": gap,
        "checks": {
            "finished_within_timeout": True,
            "identical_parameters": bool(torch.equal(ranks[0]["parameters"], ranks[1]["parameters"])),
            "losses_finite": all(math.isfinite(v) for r in ranks for v in r["losses"]),
        },
    }
    if not converter.startswith("none"):
        figures["checks"]["batchnorm_synchronised"] = ranks[0]["converted_layers"] == ranks[0]["batchnorm_layers"]
    else:
        figures["not_measured"] = {"SyncBatchNorm": converter}
    return figures


# ------------------------------------------------------------------------------------------------------ the run
PARTS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "environment": environment,
    "device_views": device_views,
    "host_syncs": host_syncs,
    "bare_step": bare_step,
    "precision": precision,
    "lightning_run": lightning_run,
    "two_process": two_process,
}


def run_part(name: str, context: Context, console: Console) -> dict[str, Any]:
    """One part: its figures and status; a raised error or a failed check fails it, and the run goes on."""
    console.log(f"part {list(PARTS).index(name) + 1}: {name}")
    start = time.perf_counter()
    try:
        figures = PARTS[name](context)
        failed = [check for check, passed in figures.get("checks", {}).items() if passed is not True]
        error = f"check failed: {', '.join(failed)}" if failed else None
    except Exception:
        figures, error = {}, traceback.format_exc()
        console.print(f"[bold red]{name} failed[/]\n{error}")
    finally:
        release_memory(context.device)
    return {"status": "failed" if error else "ok", "error": error, "seconds": time.perf_counter() - start, **figures}


def add_derived(parts: dict[str, dict[str, Any]]) -> None:
    """Figures that join two parts: the device views' share of a training step, the Lightning loop's overhead."""
    step = parts.get("bare_step", {}).get("default", {}).get("ms_per_step")
    views = parts.get("device_views")
    if views and views["status"] == "ok":
        if step:
            views["share_of_training_step"] = views["ms_per_batch"] / (views["ms_per_batch"] + step)
            views["ms_vs_bare_step"] = views["ms_per_batch"] / step
        else:
            views.setdefault("not_measured", {})["share_of_training_step"] = "needs part bare_step"
    run = parts.get("lightning_run")
    if run and run["status"] == "ok":
        if step:
            run["overhead_vs_bare_step"] = run["steady_ms_per_step"] / step - 1
            if views and views["status"] == "ok":
                run["overhead_vs_bare_step_plus_views"] = run["steady_ms_per_step"] / (step + views["ms_per_batch"]) - 1
        else:
            run.setdefault("not_measured", {})["overhead_vs_bare_step"] = "needs part bare_step"


def flatten(figures: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in figures.items():
        if key in ("status", "error", "not_measured"):
            continue
        name = f"{prefix}{key}"
        rows.extend(flatten(value, f"{name}.") if isinstance(value, dict) else [(name, value)])
    return rows


def shown(value: Any) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(shown(v) for v in value)
    return str(value).replace("|", "\\|")


def report(results: dict[str, Any]) -> str:
    """The results as a markdown page: header, parts, every figure, what was not measured, the failures."""
    env = results["parts"].get("environment", {})
    card = env.get("card") or results["device"]
    versions = ", ".join(f"{key} {env[key]}" for key in ("torch", "cuda", "cudnn", "lightning") if env.get(key))
    lines = [
        "# GPU acceptance check",
        "",
        f"Produced by `{results['command']}` on {card}, {results['date']}; {versions or 'versions not recorded'}.",
    ]
    if results["quick"]:
        lines += ["", "**--quick**: tiny sizes, a smoke test of every part; no figure here is a GPU figure."]
    lines += ["", "| part | status | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {name} | {part['status']} | {part['seconds']:.1f} |" for name, part in results["parts"].items()]
    lines += ["", "## Figures", "", "| part | figure | value |", "| --- | --- | ---: |"]
    for name, part in results["parts"].items():
        lines += [f"| {name} | {figure} | {shown(value)} |" for figure, value in flatten(part)]
    missing = [f"- {name}: not run (not among `--parts`)" for name in PARTS if name not in results["parts"]]
    for name, part in results["parts"].items():
        if part["status"] == "failed" and not part.get("checks"):
            missing.append(f"- {name}: every figure (the part failed)")
        missing += [f"- {name}.{figure}: {why}" for figure, why in part.get("not_measured", {}).items()]
    lines += ["", "## Not measured", "", *(missing or ["Every figure was measured."])]
    failures = [(name, part["error"]) for name, part in results["parts"].items() if part["error"]]
    if failures:
        lines += ["", "## Failures"]
        for name, error in failures:
            lines += ["", f"### {name}", "", "```", error.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def console_table(results: dict[str, Any]) -> Table:
    table = Table(title=f"GPU check on {results['parts'].get('environment', {}).get('card') or results['device']}")
    for column in ("part", "figure", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for name, part in results["parts"].items():
        table.add_row(name, "status", part["status"])
        for figure, value in flatten(part):
            if figure not in ("by_op", "by_place") and ".by_" not in figure and "_each_step" not in figure:
                table.add_row("", figure, shown(value))
        table.add_section()
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="every part at tiny sizes (the CPU smoke test)")
    add_device_option(parser, "device (full sizes need cuda)")
    parser.add_argument("--parts", nargs="+", choices=tuple(PARTS), default=list(PARTS), help="run only these parts")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR, help="folder of gpu_check{,_quick}.{json,md}")
    parser.add_argument(
        "--compile-backend",
        choices=("inductor", "aot_eager", "eager"),
        help="torch.compile backend of parts 4 and 7 (default: inductor, eager with --quick)",
    )
    args = parser.parse_args(argv)
    check_device(parser, args)
    if not args.quick and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --quick on the CPU")
    if not args.quick and args.device != "cuda":
        parser.error("--device cpu runs only with --quick: the full sizes are the GPU's")
    return args


def save(results: dict[str, Any], json_path: Path, start: float) -> dict[str, Any]:
    """Write the results so far, with the figures that join parts, to ``json_path`` and its ``.md`` page; after every
    part, so that a run stopped from outside (a session's time limit) leaves the parts it finished."""
    finished = copy.deepcopy(results)
    add_derived(finished["parts"])
    finished["failed"] = [name for name, part in finished["parts"].items() if part["status"] != "ok"]
    finished["runtime_s"] = time.perf_counter() - start
    json_path.write_text(json.dumps(finished, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(report(finished))
    return finished


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(["python -m benchmarks.gpu_check", *(argv if argv is not None else sys.argv[1:])])
    console = Console() if sys.stdout.isatty() else Console(width=140)
    device = torch.device(args.device)
    plan = QUICK_PLAN if args.quick else GPU_PLAN
    if args.compile_backend:
        plan = replace(plan, compile_backend=args.compile_backend)
    args.output.mkdir(parents=True, exist_ok=True)
    json_path = args.output / ("gpu_check_quick.json" if args.quick else "gpu_check.json")
    torch.manual_seed(0)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": args.device,
        "quick": args.quick,
        "plan": asdict(plan),
        "parts": {},
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        context = Context(plan, device, Path(workdir))
        for name in (name for name in PARTS if name in args.parts):
            results["parts"][name] = run_part(name, context, console)
            finished = save(results, json_path, start)
    console.print(console_table(finished))
    failed = finished["failed"]
    verdict = f"[bold red]failed: {', '.join(failed)}[/]" if failed else "[bold green]all parts ok[/]"
    console.print(f"{verdict}; wrote {json_path} and {json_path.with_suffix('.md')} in {finished['runtime_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
