"""Step time of MCL's speed options: the default model against ``method.channels_last`` and ``method.compile``.

Each variant is an MCL model with the library's defaults (FPN neck with 256 channels, 2048-wide projector and
predictors, paper montage counts), built from the same seed, with its own SGD optimiser and the same fixed batch of
random views. A timed step is one training step as ``mcl-train`` runs it: ``MCL.forward_losses`` (montages, online
and target networks, loss), backward, SGD step, EMA update. The variants take turns step by step, so that a change
in machine load affects them alike. The first ``--warmup`` steps are not timed (for ``compile`` the first one
compiles the networks: its time is reported apart, and depends on whether inductor's cache under
``/tmp/torchinductor_$USER`` already holds the kernels); the table gives the median and the minimum of ``--repeats``
timed steps and each median's ratio to the default's.

    .venv/bin/python -m benchmarks.speed_options --threads 1                   # ResNet-18, 64 px, batch 16, 3 levels
    .venv/bin/python -m benchmarks.speed_options --device cuda --amp --batch 64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.cost import StepRunner, add_device_option, check_device, clock
from mcl.loss import MultiLevelInfoNCE
from mcl.methods import MCL

# Constructor arguments of each variant, on top of the shared ones.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "channels_last+compile": {"channels_last": True, "compile": True},
}


class Runner(StepRunner):
    """One variant: its model, optimiser and batch of views; :meth:`step` runs and times one training step
    (``StepRunner.train_step``: ``forward_losses``, backward, SGD step, EMA update)."""

    def __init__(self, args: argparse.Namespace, options: dict[str, Any], device: torch.device):
        torch.manual_seed(0)  # the same weights for every variant
        self.device, self.amp = device, args.amp
        self.model = MCL(
            backbone={"name": args.backbone},
            neck={"name": "fpn", "out_channels": 256},
            image_size=args.image_size,
            levels=args.levels,
            loss=MultiLevelInfoNCE(args.levels),
            **options,
        ).to(device)
        if self.model.compile_on_fit:
            self.model.compile_networks()  # what setup("fit") does in mcl-train
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        generator = torch.Generator().manual_seed(1)
        size = args.image_size
        self.views = torch.randn(args.batch, 2, args.levels, 3, size, size, generator=generator).to(device)

    def step(self) -> float:
        """Seconds of one training step."""
        start = clock(self.device)
        self.train_step()
        return clock(self.device) - start


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, Any]]:
    """Per variant: the first step's seconds, and the timed steps after the warm-up with their median."""
    runners = {name: Runner(args, VARIANTS[name], device) for name in args.variants}
    steps: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(args.warmup + args.repeats):
        for name, runner in runners.items():
            steps[name].append(runner.step())
        print(f"round {round_index + 1}/{args.warmup + args.repeats}", flush=True)
    results = {}
    for name, seconds in steps.items():
        timed = seconds[args.warmup :]
        results[name] = {
            "first_step_s": seconds[0],
            "step_s": timed,
            "step_s_median": statistics.median(timed),
            "step_s_min": min(timed),
        }
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_option(parser, "timing device")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--backbone", default="resnet18", help="timm backbone name (default: resnet18)")
    parser.add_argument("--image-size", type=int, default=64, help="view size (default: 64)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (default: 16)")
    parser.add_argument("--levels", type=int, default=3, help="montage levels (default: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default: 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant (default: 7)")
    parser.add_argument("--amp", action="store_true", help="run the forward pass under bf16 autocast")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=tuple(VARIANTS),
        default=["default", "channels_last", "compile"],
        help="what to time (default: default channels_last compile)",
    )
    parser.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    check_device(parser, args)
    for name in ("threads", "batch", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the compiled variant's first step is its compilation")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = measure(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    setting = (
        f"{args.backbone} at {args.image_size} px, batch {args.batch}, {args.levels} levels, {name}, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}{', bf16 autocast' if args.amp else ''}"
    )
    print(f"\nTraining-step time, median of {args.repeats} after {args.warmup} warm-up steps ({setting})")
    print(f"{'variant':<24}{'median s':>10}{'min s':>10}{'vs default':>12}{'first step s':>14}")
    base = results["default"]["step_s_median"] if "default" in results else None
    for variant, row in results.items():
        ratio = f"{row['step_s_median'] / base:.2f}x" if base else "-"
        print(
            f"{variant:<24}{row['step_s_median']:>10.3f}{row['step_s_min']:>10.3f}{ratio:>12}"
            f"{row['first_step_s']:>14.1f}"
        )
    runtime = time.perf_counter() - start
    print(f"total {runtime:.0f} s")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        payload = {"setting": setting, "args": {**vars(args), "output": str(args.output)}, "results": results}
        args.output.write_text(json.dumps({**payload, "runtime_s": runtime}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
