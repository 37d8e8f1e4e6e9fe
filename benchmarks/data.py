"""Can the data pipeline feed the model? Source images per second of the CPU view pipeline (per worker process), of
the device view pipeline, and of the model's training step alone, measured in one run.

Run with ``make bench`` (after ``cost.py``) or ``.venv/bin/python -m benchmarks.data``; ``--help`` lists the options
and ``benchmarks/README.md`` explains the figures. Results go to ``benchmarks/results/data.{json,md}``.

- **CPU pipeline, per worker**: one process on one thread (what one DataLoader worker has) reads JPEG files (500 x 375,
  about ImageNet's mean size), decodes them and makes ``2 x levels`` views at 224 px with ``data.augment_on=cpu``'s
  transforms, for levels 1..4. Also timed: what a worker does with ``augment_on=device`` (decode, shrink to
  ``source_max_side``) and decoding alone.
- **Device pipeline**: :class:`mcl.data.device.DeviceViews` on a batch of decoded images, for levels 1..4, on the
  timing device (all of its threads on a CPU).
- **Model step**: ``MCL.forward_losses``, backward, SGD step and EMA update on fixed views (``benchmarks/cost.py``'s
  ``StepRunner``), ResNet-50 at 224 px, 3 levels; bf16 autocast on CUDA.
- **End to end** (CUDA by default, ``--e2e`` elsewhere): a DataLoader with ``--workers`` processes over the JPEG
  files, the transfer, ``DeviceViews`` and the same training step; its rate as a share of the model step's, and the
  model FLOP utilisation (counted FLOPs of one step / step time / the chip's peak bf16 rate, when the chip is known).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.cost import Setting, StepRunner, add_device_option, check_device, clock
from mcl.data.datamodules import MultiLevelDataModule, Transformed
from mcl.data.device import ShrinkToFit, collate_sources
from mcl.data.sources import ImageFiles, decode_image

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LEVELS = (1, 2, 3, 4)
SOURCE_SIZE = (375, 500)  # height, width
SOURCE_MAX_SIDE = 512
# Peak dense bf16 tensor FLOP/s by the name CUDA reports (vendors' data sheets, SXM parts); unknown chips: no MFU.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
# The model FLOP utilisation assumed for the GPU estimate that a CPU-only run prints (an assumption: ResNet training
# with its BatchNorm and memory-bound layers seldom does better in bf16).
ESTIMATE_MFU = 0.2
# The model-step and end-to-end setting (the target: ResNet-50, 224 px, 3 levels).
MODEL_LEVELS = 3


def plan(device: torch.device, quick: bool) -> dict[str, Any]:
    """Sizes per run kind: quick (a smoke test of every path), a CPU machine, a GPU node."""
    keys = ("image_size", "backbone", "files", "cpu_images", "rounds", "device_batch", "model_batch", "repeats",
            "warmup", "e2e_steps")  # fmt: skip
    if quick:
        values = (64, "resnet18", 8, 4, 1, 8, 16, 1, 1, 2)
    elif device.type == "cuda":
        values = (224, "resnet50", 256, 32, 3, 256, 256, 10, 3, 30)
    else:
        values = (224, "resnet50", 64, 16, 3, 32, 16, 2, 0, 3)  # the FLOP-counting step warms the model up
    return dict(zip(keys, values, strict=True))


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` JPEG files (quality 90) of smooth random colour fields with noise: photo-like to decode."""
    rng = np.random.default_rng(seed)
    height, width = SOURCE_SIZE
    paths = []
    for index in range(count):
        coarse = torch.from_numpy(rng.random((1, 3, 6, 8), dtype=np.float32))
        field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
        noise = torch.from_numpy(rng.normal(0, 0.08, (3, height, width)).astype(np.float32))
        pixels = (field + noise).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
        path = folder / f"image_{index:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def views_of(image_size: int, levels: int) -> MultiLevelDataModule:
    """The library's training views at ``levels`` (BYOL sides, ImageNet jitter and normalisation):
    ``train_transform()`` for ``augment_on=cpu``, ``make_device_views()`` for ``augment_on=device``."""
    return MultiLevelDataModule(image_size=image_size, views_per_side=levels)


def cpu_worker_rates(paths: list[Path], image_size: int, rounds: int) -> dict[str, float]:
    """Images per second of one worker process on one thread (the caller sets the thread count): for each kind of
    work, the median over ``rounds`` of a pass over ``paths``; the kinds take turns, so that a change in machine load
    affects them alike."""
    shrink = ShrinkToFit(SOURCE_MAX_SIDE)
    works: dict[str, Callable[[Path], Any]] = {
        "decode": decode_image,
        "decode_shrink": lambda p: shrink(decode_image(p)),
    }
    for levels in LEVELS:
        views = views_of(image_size, levels).train_transform()
        works[f"levels_{levels}"] = lambda p, views=views: views(decode_image(p))
    seconds: dict[str, list[float]] = {name: [] for name in works}
    for work in works.values():
        work(paths[0])  # warm-up
    for _ in range(rounds):
        for name, work in works.items():
            start = time.perf_counter()
            for path in paths:
                work(path)
            seconds[name].append(time.perf_counter() - start)
    return {name: len(paths) / statistics.median(times) for name, times in seconds.items()}


def device_rates(
    paths: list[Path], image_size: int, batch: int, device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Source images per second of :class:`DeviceViews` (BYOL sides) on ``device``, per level count."""
    images = [decode_image(paths[i % len(paths)]) for i in range(batch)]
    source = collate_sources([(image, 0) for image in images])
    source = type(source)(*(t.to(device) for t in source))
    rates = {}
    for levels in LEVELS:
        views = views_of(image_size, levels).make_device_views()
        times = []
        for step in range(warmup + repeats):
            start = clock(device)
            views(source)
            if step >= warmup:
                times.append(clock(device) - start)
        rates[f"levels_{levels}"] = batch / statistics.median(times)
    return rates


def model_step(setting: Setting, device: torch.device, amp: bool) -> tuple[StepRunner, float, int]:
    """The training step alone: a runner, its source images per second and the FLOPs of one step."""
    runner = StepRunner(setting, MODEL_LEVELS, device, amp)
    with FlopCounterMode(display=False) as counter:
        runner.train_step()
    for _ in range(setting.warmup):
        runner.train_step()
    times = [runner.timed_step()[0] for _ in range(setting.repeats)]
    return runner, setting.time_batch / statistics.median(times), counter.get_total_flops()


def end_to_end_rate(
    runner: StepRunner, paths: list[Path], setting: Setting, device: torch.device, workers: int, steps: int
) -> float:
    """Source images per second of DataLoader (``workers`` processes) + transfer + DeviceViews + training step."""
    batch = setting.time_batch
    loader = DataLoader(
        Transformed(ImageFiles(paths), ShrinkToFit(SOURCE_MAX_SIDE)),  # a data=folder worker's work
        batch_size=batch,
        sampler=RandomSampler(range(len(paths)), replacement=True, num_samples=batch * (steps + setting.warmup)),
        num_workers=workers,
        collate_fn=collate_sources,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    views = views_of(setting.image_size, MODEL_LEVELS).make_device_views()
    start = None
    for index, source in enumerate(loader):
        if index == setting.warmup:
            start = clock(device)
        source = type(source)(*(t.to(device, non_blocking=True) for t in source))
        runner.views = views(source)
        runner.train_step()
    return batch * steps / (clock(device) - start)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def environment(device: torch.device, workers: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu})",
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "workers": workers,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def report(results: dict[str, Any], command: str) -> str:
    """The results as a markdown page (also the console's table)."""
    env, sizes = results["environment"], results["plan"]
    cpu, dev, model = results["cpu_worker"], results["device_pipeline"], results["model_step"]
    lines = [
        "# Data pipeline throughput",
        "",
        f"Produced by `{command}` on {env['device']}, {env['cpu_cores']} CPU cores, torch {env['torch']}; "
        f"{sizes['image_size']} px views, source JPEGs {SOURCE_SIZE[1]} x {SOURCE_SIZE[0]}; one run (no seeds).",
        "",
        "Source images per second (each source image gives 2 x levels views):",
        "",
        "| pipeline | levels 1 | levels 2 | levels 3 | levels 4 |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| CPU views, one worker (1 thread) | " + " | ".join(f"{cpu[f'levels_{n}']:.1f}" for n in LEVELS) + " |",
        f"| device views, batch {sizes['device_batch']} on {env['device']} | "
        + " | ".join(f"{dev[f'levels_{n}']:.0f}" for n in LEVELS)
        + " |",
        "",
        f"One worker with `augment_on=device` (decode + shrink to {SOURCE_MAX_SIDE}): "
        f"{cpu['decode_shrink']:.1f} images/s "
        f"(decode alone {cpu['decode']:.1f}); per image that is {1000 / cpu['decode_shrink']:.1f} ms against "
        + ", ".join(f"{1000 / cpu[f'levels_{n}']:.1f}" for n in LEVELS)
        + " ms for the CPU views of levels 1..4.",
        "",
        f"Model step alone ({model['backbone']}, {sizes['image_size']} px, {MODEL_LEVELS} levels, batch "
        f"{model['batch']}{', bf16' if model['amp'] else ''}): {model['images_per_s']:.1f} source images/s, "
        f"{model['gflop_per_step']:.0f} GFLOP per step.",
        "",
        f"Worker processes needed to keep up with that step: {model['cores_cpu_views']:.2f} with CPU views "
        f"({MODEL_LEVELS} levels), {model['cores_device_views']:.2f} with device views (decode and shrink only).",
    ]
    if env["device"].startswith("cpu") and sizes["backbone"] == "resnet50":
        # What a GPU would need, from the counted FLOPs: an estimate, not a measurement.
        flop_per_image = model["gflop_per_step"] * 1e9 / model["batch"]
        rate = ESTIMATE_MFU * PEAK_BF16["H100"] / flop_per_image
        lines += [
            "",
            f"Estimate for a GPU (not measured here): an H100 at an assumed {100 * ESTIMATE_MFU:.0f}% of its peak bf16 "
            f"rate would step {rate:.0f} source images/s ({flop_per_image / 1e9:.0f} GFLOP per image); CPU views would "
            "need "
            f"{rate / cpu[f'levels_{MODEL_LEVELS}']:.0f} worker cores at this machine's per-core rate, device views "
            f"{rate / cpu['decode_shrink']:.0f}.",
        ]
    e2e = results.get("end_to_end")
    if e2e:
        lines += [
            "",
            f"End to end ({e2e['workers']} workers, device views, same step): {e2e['images_per_s']:.1f} images/s = "
            f"{100 * e2e['share_of_model_step']:.0f}% of the model step alone (target: at least 90%).",
        ]
        if e2e.get("mfu") is not None:
            lines.append(f"Model FLOP utilisation: {100 * e2e['mfu']:.1f}% of the chip's peak bf16 rate (model step "
                         f"alone: {100 * model['mfu']:.1f}%).")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one step each: a smoke test")
    add_device_option(parser, "device for views/steps")
    parser.add_argument("--workers", type=int, help="DataLoader workers end to end (default: CPU cores - 2, >= 1)")
    parser.add_argument("--e2e", action="store_true", help="also run end to end on a CPU (always on CUDA)")
    parser.add_argument("--output", type=Path, help="JSON file (default: benchmarks/results/data.json)")
    args = parser.parse_args(argv)
    check_device(parser, args)
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be 0 or more")
    if args.workers is None:
        args.workers = max(1, (os.cpu_count() or 1) - 2)
    if args.output is None:
        args.output = RESULTS_DIR / ("data_quick.json" if args.quick else "data.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(["python -m benchmarks.data", *(argv if argv is not None else sys.argv[1:])])
    console = Console() if sys.stdout.isatty() else Console(width=140)
    device = torch.device(args.device)
    sizes = plan(device, args.quick)
    amp = device.type == "cuda"
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    start = time.perf_counter()
    results: dict[str, Any] = {"environment": environment(device, args.workers), "plan": sizes}
    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(Path(folder), sizes["files"])
        torch.set_num_threads(1)  # one DataLoader worker's share
        results["cpu_worker"] = cpu_worker_rates(paths[: sizes["cpu_images"]], sizes["image_size"], sizes["rounds"])
        torch.set_num_threads(threads)
        console.print(f"CPU worker: {results['cpu_worker']}")
        results["device_pipeline"] = device_rates(
            paths, sizes["image_size"], sizes["device_batch"], device, sizes["repeats"], sizes["warmup"]
        )
        console.print(f"device pipeline: {results['device_pipeline']}")
        setting = Setting(
            sizes["backbone"], sizes["image_size"], sizes["model_batch"], sizes["model_batch"], sizes["repeats"],
            sizes["warmup"],
        )  # fmt: skip
        runner, rate, flops = model_step(setting, device, amp)
        peak = peak_flops(device)
        step_s = setting.time_batch / rate
        results["model_step"] = {
            "backbone": sizes["backbone"],
            "batch": setting.time_batch,
            "amp": amp,
            "images_per_s": rate,
            "gflop_per_step": flops / 1e9,
            "mfu": flops / step_s / peak if peak else None,
            "cores_cpu_views": rate / results["cpu_worker"][f"levels_{MODEL_LEVELS}"],
            "cores_device_views": rate / results["cpu_worker"]["decode_shrink"],
        }
        console.print(f"model step: {rate:.1f} images/s")
        if device.type == "cuda" or args.e2e or args.quick:
            e2e = end_to_end_rate(runner, paths, setting, device, args.workers, sizes["e2e_steps"])
            results["end_to_end"] = {
                "workers": args.workers,
                "images_per_s": e2e,
                "share_of_model_step": e2e / rate,
                "mfu": flops * e2e / setting.time_batch / peak if peak else None,
            }
    results["runtime_s"] = time.perf_counter() - start
    page = report(results, command)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(page)
    table = Table(title="source images per second")
    for column in ("pipeline", *(f"levels {n}" for n in LEVELS)):
        table.add_column(column, justify="right")
    table.add_row("CPU views, 1 worker", *(f"{results['cpu_worker'][f'levels_{n}']:.1f}" for n in LEVELS))
    table.add_row(
        f"device views ({args.device})", *(f"{results['device_pipeline'][f'levels_{n}']:.0f}" for n in LEVELS)
    )
    console.print(table)
    console.print(page)
    console.print(f"wrote {args.output} and {args.output.with_suffix('.md')} in {results['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
