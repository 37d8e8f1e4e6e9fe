"""Cost of MCL's montage levels: FLOPs and step time of levels 1..4, relative to levels=1.

Run with ``make bench`` (``.venv/bin/python -m benchmarks.cost``); ``--help`` lists the options and
``benchmarks/README.md`` explains the figures. Results go to ``benchmarks/results/cost.json``.

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` on ``meta`` tensors (shapes only, no
arithmetic), through the library's own code: ``MCL.build_montages``, ``MCL.online_pass`` and ``MCL.target_pass``.
The online network (montages -> backbone -> pyramid -> tile head -> projector -> per-level predictors, forward
and backward) and the target network (forward only; under the default ``bn_groups=per_side`` its backbone sees the
montages too, as in the released code) are counted apart. Step times are
wall-clock times of a whole training step (``MCL.forward_losses``, backward, SGD step, EMA update).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from mcl.loss import MultiLevelInfoNCE
from mcl.methods import MCL
from mcl.methods.bn_groups import BN_GROUPS
from mcl.runtime import cudnn_benchmark
from mcl.stepping import train_step

LEVELS = (1, 2, 3, 4)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
EMA_MOMENTUM = 0.99
# The acceptance check: with only the needed pyramid levels computed, 3 levels cost at most 1.40x the
# online FLOPs of 1 level, in the paper's setting (ResNet-50 at 224 px).
CHECK_SETTING, CHECK_LEVELS, CHECK_LIMIT = "resnet50@224", 3, 1.40
# The BatchNorm groupings are compared at the paper's level count.
GROUPING_LEVELS = 3

# One side's montages per level, as ``MultiLevelModule.build_montages`` returns them: ``(montages, sources)``.
Side = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Setting:
    """A network and input size; FLOPs are counted at ``flop_batch``, step times taken at ``time_batch``."""

    backbone: str
    image_size: int
    flop_batch: int
    time_batch: int
    repeats: int
    warmup: int

    @property
    def name(self) -> str:
        return f"{self.backbone}@{self.image_size}"


# Meta-tensor FLOP counts are checked against a real run of this small setting, at 4 levels.
SELF_CHECK = Setting("resnet18", 64, flop_batch=8, time_batch=8, repeats=1, warmup=0)
SELF_CHECK_LEVELS = 4


def settings_for(device: torch.device, quick: bool, repeats: int | None) -> list[Setting]:
    """The benchmark's settings, sized to take a few minutes on a 2-core CPU.

    FLOP counts cost no arithmetic, so they always use a per-device batch of 64, where the paper's
    ``B / 4**i`` montages per level is exact for all 4 levels. Step times use a batch the device can afford.
    """
    if quick:
        plan = {"resnet18": (64, 8, 1, 0), "resnet50": (224, 2, 1, 0)}
    elif device.type == "cuda":
        plan = {"resnet18": (64, 64, 20, 5), "resnet50": (224, 64, 10, 3)}
    else:
        plan = {"resnet18": (64, 64, 3, 1), "resnet50": (224, 8, 2, 1)}
    return [
        Setting(name, size, 64, batch, default_repeats if repeats is None else repeats, warmup)
        for name, (size, batch, default_repeats, warmup) in plan.items()
    ]


def appendix_ratio(levels: int) -> float:
    """Images through the online backbone vs one level, ``sum(4**-i)``: 1, 1.25, 1.3125, 1.328125."""
    return sum(4.0**-level for level in range(levels))


def build_model(setting: Setting, levels: int, bn_groups: str = "per_side") -> MCL:
    """An MCL model with the library's defaults (paper montage counts and level weights, FPN neck), on CPU."""
    return MCL(
        backbone={"name": setting.backbone},
        neck={"name": "fpn", "out_channels": 256},
        image_size=setting.image_size,
        levels=levels,
        montage_counts="paper",
        loss=MultiLevelInfoNCE(levels, level_weights="paper"),
        bn_groups=bn_groups,
    )


# --------------------------------------------------------------------------------------------------- FLOPs
def counted_flops(step: Callable[[], Any]) -> int:
    """FLOPs of the matmuls and convolutions that ``step`` runs (forward and, if it calls it, backward)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def assemble(model: MCL, batch: int) -> tuple[list[Side], int]:
    """Both sides' montages of a batch of blank views, built by ``model.build_montages``, and their FLOPs."""
    size = model.image_size
    views = torch.zeros(1, 1, 1, 3, size, size, device=model.device)
    views = views.expand(batch, 2, model.levels, 3, size, size)
    sides: list[Side] = []
    flops = counted_flops(lambda: sides.extend(model.build_montages(views[:, side]) for side in range(2)))
    return sides, flops


def online_network(model: MCL, sides: list[Side]) -> torch.Tensor:
    """``MCL.online_pass`` (what ``forward_losses`` runs on the online side), reduced to a scalar to backpropagate."""
    return torch.stack([p.sum() for p in model.online_pass(sides).values()]).sum()


def online_backbone(model: MCL, sides: list[Side]) -> torch.Tensor:
    """The backbone alone on the same montages, reduced to a scalar: its part of the online cost."""
    features = model.backbone(torch.cat([montages for side in sides for montages, _ in side]))
    return torch.stack([f.sum() for f in features]).sum()


def network_flops(model: MCL, sides: list[Side]) -> dict[str, Any]:
    """FLOPs of the online network (forward + backward) on both sides' montages, of its backbone alone, and of
    the target network (``MCL.target_pass``, forward), on the model's device."""
    device = model.device
    sides = [[(montages.to(device), sources.to(device)) for montages, sources in side] for side in sides]
    online = counted_flops(lambda: online_network(model, sides).backward())
    model.zero_grad(set_to_none=True)
    backbone = counted_flops(lambda: online_backbone(model, sides).backward())
    model.zero_grad(set_to_none=True)
    batch, size = len(sides[0][0][0]), model.image_size
    views = torch.zeros(1, 1, 1, 3, size, size, device=device).expand(batch, 2, model.levels, 3, size, size)
    target = counted_flops(lambda: model.target_pass(views, sides))
    return {"online_flops": online, "online_backbone_flops": backbone, "target_flops": target}


def count_flops(
    setting: Setting, levels: int, batches: tuple[int, ...], meta: bool = True, bn_groups: str = "per_side"
) -> dict[int, Any]:
    """Per batch size, the FLOPs of one training step: montage assembly, online network, target network.

    ``model.build_montages`` runs on the CPU (its random generator needs a real device); with ``meta`` the
    networks then run on ``meta`` tensors, which gives the same counts at no arithmetic cost.
    """
    model = build_model(setting, levels, bn_groups)
    assembled = {batch: assemble(model, batch) for batch in batches}
    model.to("meta" if meta else "cpu")
    counts = {}
    for batch, (sides, assembly) in assembled.items():
        flops = network_flops(model, sides)
        montages_per_side = [len(montages) for montages, _ in sides[0]]
        counts[batch] = {
            "batch": batch,
            "montages_per_side": montages_per_side,
            "backbone_images_ratio": sum(montages_per_side) / batch,
            "montage_assembly_flops": assembly,
            **flops,
            "online_flops": assembly + flops["online_flops"],
        }
    return counts


def meta_matches_real() -> dict[str, Any]:
    """Cross-check: counting on ``meta`` tensors gives the same FLOPs as running the networks for real."""
    batches = (SELF_CHECK.flop_batch,)
    (meta,) = count_flops(SELF_CHECK, SELF_CHECK_LEVELS, batches, meta=True).values()
    (real,) = count_flops(SELF_CHECK, SELF_CHECK_LEVELS, batches, meta=False).values()
    keys = ("online_flops", "online_backbone_flops", "target_flops")
    return {
        "setting": SELF_CHECK.name,
        "levels": SELF_CHECK_LEVELS,
        "batch": SELF_CHECK.flop_batch,
        "passed": all(meta[key] == real[key] for key in keys),
        "meta": meta,
        "real": real,
    }


# ----------------------------------------------------------------------------------------------- step time
def clock(device: torch.device) -> float:
    """Wall-clock seconds, once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextmanager
def timed_montages(model: MCL, device: torch.device) -> Iterator[list[float]]:
    """Record the seconds of each ``model.build_montages`` call made while the block runs."""
    records: list[float] = []
    build = model.build_montages

    def timed_build(views: torch.Tensor) -> Side:
        start = clock(device)
        montages = build(views)
        records.append(clock(device) - start)
        return montages

    model.build_montages = timed_build
    try:
        yield records
    finally:
        del model.build_montages


class StepRunner:
    """A model, its optimiser and a fixed batch of random views: times training steps of one level count."""

    def __init__(self, setting: Setting, levels: int, device: torch.device, amp: bool, bn_groups: str = "per_side"):
        self.device = device
        self.amp = amp
        self.model = build_model(setting, levels, bn_groups).to(device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        size = setting.image_size
        self.views = torch.randn(setting.time_batch, 2, levels, 3, size, size, device=device)

    def train_step(self) -> None:
        """One step as in training (:func:`mcl.stepping.train_step`): ``forward_losses`` (online and target),
        backward, SGD step, EMA update."""
        train_step(self.model, self.optimizer, self.views, momentum=EMA_MOMENTUM, amp=self.amp)

    def timed_step(self) -> tuple[float, float]:
        """Seconds of one training step, and of the montage assembly (both sides) within it."""
        with timed_montages(self.model, self.device) as records:
            start = clock(self.device)
            self.train_step()
            elapsed = clock(self.device) - start
        return elapsed, sum(records)


def time_steps(setting: Setting, device: torch.device, amp: bool) -> dict[int, dict[str, Any]]:
    """Per level count: step times and montage-assembly shares of ``setting.repeats`` steps after warm-up."""
    return interleaved_times(setting, {levels: StepRunner(setting, levels, device, amp) for levels in LEVELS})


def interleaved_times(setting: Setting, runners: dict[Any, StepRunner]) -> dict[Any, dict[str, Any]]:
    """Per runner: step times and montage-assembly shares of ``setting.repeats`` steps after warm-up.

    The runners take turns step by step, so that a change in machine load affects all of them alike.
    """
    steps: dict[Any, list[float]] = {key: [] for key in runners}
    montages: dict[Any, list[float]] = {key: [] for key in runners}
    for round_index in range(setting.warmup + setting.repeats):
        for key, runner in runners.items():
            step_s, montage_s = runner.timed_step()
            if round_index >= setting.warmup:
                steps[key].append(step_s)
                montages[key].append(montage_s)
    device = next(iter(runners.values())).device
    runners.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {key: summarize_steps(setting, steps[key], montages[key]) for key in steps}


def summarize_steps(setting: Setting, steps: list[float], montages: list[float]) -> dict[str, Any]:
    return {
        "batch": setting.time_batch,
        "warmup": setting.warmup,
        "repeats": setting.repeats,
        "step_s": steps,
        "step_s_median": statistics.median(steps),
        "step_s_min": min(steps),
        "montage_s": montages,
        "montage_share": statistics.median(m / s for m, s in zip(montages, steps, strict=True)),
    }


# ----------------------------------------------------------------------------------- BatchNorm grouping
def grouping_costs(setting: Setting, device: torch.device, amp: bool, console: Console) -> list[dict[str, Any]]:
    """FLOPs and step time of each ``bn_groups`` choice at 3 levels; ratios against ``joint``."""
    console.log(f"{setting.name}: bn_groups {list(BN_GROUPS)} at {GROUPING_LEVELS} levels")
    flops = {
        groups: count_flops(setting, GROUPING_LEVELS, (setting.flop_batch,), bn_groups=groups)[setting.flop_batch]
        for groups in BN_GROUPS
    }
    runners = {groups: StepRunner(setting, GROUPING_LEVELS, device, amp, groups) for groups in BN_GROUPS}
    timing = interleaved_times(setting, runners)
    base_flops, base_time = flops["joint"], timing["joint"]["step_s_median"]
    return [
        {
            "setting": setting.name,
            "levels": GROUPING_LEVELS,
            "bn_groups": groups,
            "flop_batch": setting.flop_batch,
            "online_flops": flops[groups]["online_flops"],
            "target_flops": flops[groups]["target_flops"],
            "target_ratio": flops[groups]["target_flops"] / base_flops["target_flops"],
            "time": timing[groups],
            "time_ratio": timing[groups]["step_s_median"] / base_time,
        }
        for groups in BN_GROUPS
    ]


# ---------------------------------------------------------------------------------------------- the bench
def ratio(row: dict[str, Any], base: dict[str, Any], key: str) -> float:
    return row[key] / base[key]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios of every row to the ``levels=1`` row, in place."""
    base = rows[0]
    for row in rows:
        for key in ("flops", "flops_at_time_batch"):
            flops, base_flops = row[key], base[key]
            flops["online_ratio"] = ratio(flops, base_flops, "online_flops")
            flops["online_backbone_ratio"] = ratio(flops, base_flops, "online_backbone_flops")
            total, base_total = (f["online_flops"] + f["target_flops"] for f in (flops, base_flops))
            flops["online_plus_target_ratio"] = total / base_total
        row["time"]["ratio"] = ratio(row["time"], base["time"], "step_s_median")


def run_setting(setting: Setting, device: torch.device, amp: bool, console: Console) -> dict[str, Any]:
    """FLOPs and step times of levels 1..4 for one setting."""
    batches = tuple(dict.fromkeys((setting.flop_batch, setting.time_batch)))
    flops = {}
    for levels in LEVELS:
        console.log(f"{setting.name}: counting FLOPs of levels={levels} at batch {list(batches)}")
        flops[levels] = count_flops(setting, levels, batches)
    console.log(
        f"{setting.name}: timing levels {list(LEVELS)} at batch {setting.time_batch} on {device}, "
        f"{setting.warmup} warm-up + {setting.repeats} timed steps each"
    )
    timing = time_steps(setting, device, amp)
    rows = [
        {
            "levels": levels,
            "appendix_ratio": appendix_ratio(levels),
            "flops": dict(flops[levels][setting.flop_batch]),
            "flops_at_time_batch": dict(flops[levels][setting.time_batch]),
            "time": timing[levels],
        }
        for levels in LEVELS
    ]
    add_ratios(rows)
    return {
        "name": setting.name,
        "backbone": setting.backbone,
        "image_size": setting.image_size,
        "rows": rows,
    }


def flop_check(settings: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's check: online FLOPs of 3 levels at most 1.40x those of 1 level, ResNet-50 at 224 px."""
    setting = next(s for s in settings if s["name"] == CHECK_SETTING)
    row = next(r for r in setting["rows"] if r["levels"] == CHECK_LEVELS)
    online_ratio = row["flops"]["online_ratio"]
    return {
        "setting": CHECK_SETTING,
        "levels": CHECK_LEVELS,
        "batch": row["flops"]["batch"],
        "online_flop_ratio": online_ratio,
        "limit": CHECK_LIMIT,
        "passed": online_ratio <= CHECK_LIMIT,
    }


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu})",
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "amp_bf16": args.amp,
        "quick": args.quick,
    }


# -------------------------------------------------------------------------------------------------- output
def times(value: float) -> str:
    return f"{value:.4f}x"


def flop_table(settings: list[dict[str, Any]]) -> Table:
    table = Table(title="FLOPs per training step (online: forward + backward; target: forward)")
    columns = ("setting", "levels", "batch", "montages/side", "appendix", "backbone", "online")
    for column in (*columns, "online GFLOP", "target GFLOP", "online+target"):
        table.add_column(column, justify="right")
    for setting in settings:
        for row in setting["rows"]:
            flops = row["flops"]
            table.add_row(
                setting["name"],
                str(row["levels"]),
                str(flops["batch"]),
                str(flops["montages_per_side"]),
                times(row["appendix_ratio"]),
                times(flops["online_backbone_ratio"]),
                times(flops["online_ratio"]),
                f"{flops['online_flops'] / 1e9:,.1f}",
                f"{flops['target_flops'] / 1e9:,.1f}",
                times(flops["online_plus_target_ratio"]),
            )
        table.add_section()
    return table


def time_table(settings: list[dict[str, Any]], device: str) -> Table:
    table = Table(title=f"Training step time on {device} (median)")
    columns = ("setting", "levels", "batch", "montages/side", "online FLOPs", "step FLOPs", "step s", "time")
    columns = (*columns, "montages")
    for column in columns:
        table.add_column(column, justify="right")
    for setting in settings:
        for row in setting["rows"]:
            timing, at_time = row["time"], row["flops_at_time_batch"]
            table.add_row(
                setting["name"],
                str(row["levels"]),
                f"{timing['batch']} ({timing['warmup']}+{timing['repeats']})",
                str(at_time["montages_per_side"]),
                times(at_time["online_ratio"]),
                times(at_time["online_plus_target_ratio"]),
                f"{timing['step_s_median']:.3f}",
                times(timing["ratio"]),
                f"{100 * timing['montage_share']:.2f}%",
            )
        table.add_section()
    return table


def grouping_table(rows: list[dict[str, Any]], device: str) -> Table:
    table = Table(title=f"BatchNorm grouping (method.bn_groups), {GROUPING_LEVELS} levels; time on {device}")
    for column in ("setting", "bn_groups", "online GFLOP", "target GFLOP", "target", "step s", "time"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["setting"],
            row["bn_groups"],
            f"{row['online_flops'] / 1e9:,.1f}",
            f"{row['target_flops'] / 1e9:,.1f}",
            times(row["target_ratio"]),
            f"{row['time']['step_s_median']:.3f}",
            times(row["time_ratio"]),
        )
    return table


FLOP_LEGEND = (
    "appendix: sum(4^-i), images through the online backbone vs 1 level (1.3125x for 3 levels). "
    "backbone, online, online+target: measured FLOP ratios vs levels=1 at the same batch."
)
TIME_LEGEND = (
    "batch: per-device batch (warm-up + timed steps). online FLOPs, step FLOPs: FLOP ratios of the online "
    "network, and of online + target, at that batch (at least 1 montage per level, so small batches exceed "
    "the appendix). time: step-time ratio vs levels=1. montages: share of the step spent in build_montages "
    "(both sides). A step is forward_losses (online + target), backward, SGD step and EMA update."
)


def report(results: dict[str, Any], console: Console) -> None:
    settings = results["settings"]
    console.print(flop_table(settings))
    console.print(FLOP_LEGEND)
    console.print(time_table(settings, results["environment"]["device"]))
    console.print(TIME_LEGEND)
    console.print(grouping_table(results["bn_groups"], results["environment"]["device"]))
    console.print(
        "target, time: target FLOPs and step time vs bn_groups=joint (FLOPs at batch 64, time at the timing batch)."
    )
    check, self_check = results["check"], results["self_check"]
    verdict = "[bold green]PASS[/]" if check["passed"] else "[bold red]FAIL[/]"
    console.print(
        f"{verdict} {check['setting']}, {check['levels']} levels, batch {check['batch']}: online FLOPs "
        f"{times(check['online_flop_ratio'])} of levels=1, limit {check['limit']:.2f}x "
        "(only the pyramid levels each montage level needs are computed)"
    )
    agree = "agree" if self_check["passed"] else "[bold red]DISAGREE[/]"
    console.print(
        f"meta-tensor and real FLOP counts {agree} ({self_check['setting']}, levels={self_check['levels']}, "
        f"batch {self_check['batch']})"
    )


# ---------------------------------------------------------------------------------------------------- main
def add_device_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--device cpu|cuda``, CUDA by default where there is one; :func:`check_device` after parsing."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device, help=help)


def check_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop with a parser error when ``--device cuda`` was asked for on a machine without CUDA; on CUDA, set cuDNN's
    autotuning as GPU training does (:func:`mcl.runtime.cudnn_benchmark`), so the figures are training's."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny timing batches, one step: a smoke test")
    parser.add_argument("--output", type=Path, help="JSON file (default: benchmarks/results/cost.json)")
    add_device_option(parser, "timing device")
    parser.add_argument("--repeats", type=int, help="timed steps per level count, after the warm-up")
    parser.add_argument("--amp", action="store_true", help="time the steps under bf16 autocast")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args(argv)
    check_device(parser, args)
    for name in ("repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.output is None:
        args.output = RESULTS_DIR / ("cost_quick.json" if args.quick else "cost.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=140)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    results: dict[str, Any] = {"environment": environment(device, args)}
    settings = settings_for(device, args.quick, args.repeats)
    results["settings"] = [run_setting(setting, device, args.amp, console) for setting in settings]
    results["bn_groups"] = [row for setting in settings for row in grouping_costs(setting, device, args.amp, console)]
    results["check"] = flop_check(results["settings"])
    results["self_check"] = meta_matches_real()
    results["runtime_s"] = time.perf_counter() - start
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    report(results, console)
    console.print(f"wrote {args.output} in {results['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
