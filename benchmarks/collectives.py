"""Collectives per MCL training step with synchronised BatchNorm, counted in 2 gloo processes on the CPU.

Each rank builds the model as ``cost.py`` does (library defaults: FPN neck with 256 channels, paper montage counts,
``bn_groups=per_side``, 3 levels), wraps it in ``DistributedDataParallel`` as Lightning's ``ddp`` strategy does
(default settings: gradient buckets of 25 MB, buffers broadcast from rank 0 at every forward) and runs training
steps: ``MCL.forward_losses`` through the DDP wrapper, then backward (no optimiser step, so every step sees the
same weights). Two models with the same weights take turns step by step: one with its own BatchNorm layers (no
synchronisation), one with every BatchNorm converted by :func:`mcl.syncbn.convert_sync_batchnorm`. The second step
of each is counted (the first lets DDP rebuild its buckets); the seconds are the median of ``--repeats`` steps
after the first.

Counted: BatchNorm calls in train mode (forward hooks; online pass and target pass apart), calls of
``torch.distributed.all_reduce`` (wrapped): those of ``mcl.syncbn`` in the forward passes and in backward, and DDP's
gradient all_reduces (one per bucket, from DDP's default comm hook, registered so as to tell them apart), DDP's
buffer broadcasts (its ``_sync_buffers``), and host syncs (:class:`mcl.hostsync.HostSyncCounter`). torch's
``nn.SyncBatchNorm`` runs on CUDA/XPU inputs only, so its figures are derived from the counted calls, following
``torch/nn/modules/_functions.py``: per forward call one all_gather and a boolean-mask index of the gathered
statistics (3 ``t[mask]`` ops, each a host sync; the first waits for the all_gather), per backward call one
all_reduce.

With ``--compile`` (on by default) the converted model then compiles its networks (``MCL.compile_networks`` with
``compile_backend=aot_eager``: dynamo traces, AOT autograd builds the backward graphs, no C++ code generation) and
runs one step in the same process group; dynamo's counters give the graphs captured and the graph breaks.

    .venv/bin/python -m benchmarks.collectives                            # ResNet-18 @ 64 px, ResNet-50 @ 224 px
    .venv/bin/python -m benchmarks.collectives --settings resnet18@64:8 --no-compile
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from benchmarks.cost import RESULTS_DIR, Setting, build_model
from mcl.hostsync import HostSyncCounter
from mcl.methods import MCL
from mcl.syncbn import convert_sync_batchnorm

WORLD = 2
LEVELS = 3
DEFAULT_SETTINGS = ("resnet18@64:8", "resnet50@224:2")
# torch's nn.SyncBatchNorm forward indexes count, mean and invstd of all ranks with a boolean mask.
TORCH_MASK_INDEXES_PER_CALL = 3


def parse_setting(text: str) -> Setting:
    """``backbone@image_size:batch`` (per rank), e.g. ``resnet18@64:8``."""
    try:
        backbone, rest = text.split("@")
        size, batch = (int(part) for part in rest.split(":"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not backbone@image_size:batch, e.g. resnet18@64:8") from error
    return Setting(backbone, size, flop_batch=batch, time_batch=batch, repeats=1, warmup=1)


class Step(nn.Module):
    """``MCL.forward_losses`` as a module's forward, so that DDP wraps it as Lightning's strategy wraps the
    LightningModule; the phases (online pass, target pass, backward) are tallied in ``counts``."""

    def __init__(self, model: MCL):
        super().__init__()
        self.model = model
        self.phase = "outside"
        self.counts: Counter = Counter()
        for name in ("online_pass", "target_pass"):
            setattr(model, name, self._in_phase(name.removesuffix("_pass"), getattr(model, name)))

    def _in_phase(self, phase: str, function: Callable) -> Callable:
        def run(*args: Any) -> Any:
            self.phase = phase
            try:
                return function(*args)
            finally:
                self.phase = "outside"

        return run

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.model.forward_losses(views)[0]


def count_batchnorm_calls(step: Step) -> None:
    """Count each train-mode BatchNorm call in ``step.counts`` under ``bn/<phase>``."""

    def hook(module: nn.Module, args: Any) -> None:
        if module.training:
            step.counts[f"bn/{step.phase}"] += 1

    for module in step.model.modules():
        if isinstance(module, _BatchNorm):
            module.register_forward_pre_hook(hook)


@contextmanager
def counting_all_reduces(step: Step) -> Iterator[None]:
    """Count the calls of ``torch.distributed.all_reduce`` (what ``mcl.syncbn`` calls, and DDP's default comm hook)
    under ``all_reduce/<phase>``."""
    original = dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        step.counts[f"all_reduce/{step.phase}"] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counted
    try:
        yield
    finally:
        dist.all_reduce = original


def wrap_ddp(step: Step) -> DistributedDataParallel:
    """``step`` in DDP; its gradient all_reduces count under the phase ``ddp``, its buffer broadcasts under
    ``ddp/buffer_broadcasts``."""
    ddp = DistributedDataParallel(step)

    def bucket_hook(state, bucket):  # unannotated: DDP checks the annotations' objects, and these are strings
        phase, step.phase = step.phase, "ddp"
        try:
            return default_hooks.allreduce_hook(state, bucket)
        finally:
            step.phase = phase

    ddp.register_comm_hook(None, bucket_hook)
    sync_buffers = ddp._sync_buffers

    def counted_sync_buffers() -> None:
        step.counts["ddp/buffer_broadcasts"] += 1
        sync_buffers()

    ddp._sync_buffers = counted_sync_buffers
    return ddp


def run_step(ddp: DistributedDataParallel, step: Step, views: torch.Tensor) -> dict[str, Any]:
    """One training step (forward through DDP, backward): its counts, host syncs and seconds."""
    step.counts.clear()
    step.model.zero_grad(set_to_none=True)
    dist.barrier()
    start = time.perf_counter()
    with HostSyncCounter() as syncs, counting_all_reduces(step):
        loss = ddp(views)
        step.phase = "backward"
        loss.backward()
        step.phase = "outside"
    seconds = time.perf_counter() - start
    return {**step.counts, "host_syncs": syncs.record.total, "seconds": seconds}


def measure(setting: Setting, rank: int, repeats: int) -> dict[str, Any]:
    """Counts of the second training step and the median seconds of ``repeats`` steps after the first, with plain
    and with converted BatchNorm (two models with the same weights, each in its own DDP wrapper; they take turns
    step by step)."""
    torch.manual_seed(rank + 1)
    views = torch.randn(setting.time_batch, 2, LEVELS, 3, setting.image_size, setting.image_size)
    steps = {}
    for variant, convert in (("plain", lambda model: model), ("synced", convert_sync_batchnorm)):
        torch.manual_seed(0)
        step = Step(convert(build_model(setting, LEVELS)))
        count_batchnorm_calls(step)
        steps[variant] = (wrap_ddp(step), step)
    records: dict[str, list[dict[str, Any]]] = {variant: [] for variant in steps}
    for _ in range(1 + repeats):
        for variant, (ddp, step) in steps.items():
            records[variant].append(run_step(ddp, step, views))
    return {
        variant: {**counted[1], "seconds": statistics.median(record["seconds"] for record in counted[1:])}
        for variant, counted in records.items()
    }


def graph_breaks(setting: Setting, rank: int) -> dict[str, Any]:
    """Graphs and graph breaks of ``MCL.compile_networks`` (backend ``aot_eager``) over one training step of the
    converted model, in DDP."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = convert_sync_batchnorm(build_model(setting, LEVELS))
    model.compile_backend = "aot_eager"
    model.compile_networks()
    step = Step(model)
    ddp = DistributedDataParallel(step)
    torch.manual_seed(rank + 1)
    views = torch.randn(setting.time_batch, 2, LEVELS, 3, setting.image_size, setting.image_size)
    start = time.perf_counter()
    ddp(views).backward()
    return {
        "compiled_modules": len(model.compiled_modules()),
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "break_reasons": dict(counters["graph_break"]),
        "seconds": time.perf_counter() - start,
    }


def worker(rank: int, port: int, settings: list[Setting], repeats: int, compile: bool, results: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    for setting in settings:
        counted = measure(setting, rank, repeats)
        if compile:
            counted["compile"] = graph_breaks(setting, rank)
        results[f"{setting.name}:{setting.time_batch}/{rank}"] = counted
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -------------------------------------------------------------------------------------------------- output
def rows(counted: dict[str, Any]) -> list[tuple[str, str]]:
    """The table's rows for one setting (rank 0's counts)."""
    plain, synced = counted["plain"], counted["synced"]
    online, target = synced.get("bn/online", 0), synced.get("bn/target", 0)
    forward_calls = online + target
    backward = synced.get("all_reduce/backward", 0)
    table = [
        ("BatchNorm calls, online forward", f"{online}"),
        ("BatchNorm calls, target forward (no grad)", f"{target}"),
        ("BatchNorm calls outside the two passes", f"{synced.get('bn/outside', 0)}"),
        ("torch nn.SyncBatchNorm (derived): forward all_gathers", f"{forward_calls}"),
        (
            "torch nn.SyncBatchNorm (derived): forward host syncs",
            f"{forward_calls} waits ({TORCH_MASK_INDEXES_PER_CALL * forward_calls} mask-index ops)",
        ),
        ("torch nn.SyncBatchNorm (derived): backward all_reduces", f"{online}"),
        ("mcl.syncbn (counted): forward all_reduces", f"{synced.get('all_reduce/online', 0)} + "
         f"{synced.get('all_reduce/target', 0)} = {forward_calls}"),
        ("mcl.syncbn (counted): backward all_reduces", f"{backward}"),
        ("host syncs per step: plain BN / mcl.syncbn", f"{plain['host_syncs']} / {synced['host_syncs']}"),
        ("DDP gradient all_reduces (buckets), both", f"{synced.get('all_reduce/ddp', 0)}"),
        ("DDP buffer syncs (1 broadcast per buffer dtype), both", f"{synced.get('ddp/buffer_broadcasts', 0)}"),
        ("step seconds (median): plain BN / mcl.syncbn", f"{plain['seconds']:.2f} / {synced['seconds']:.2f}"),
    ]  # fmt: skip
    if "compile" in counted:
        compiled = counted["compile"]
        reasons = "; ".join(f"{reason} x{n}" for reason, n in compiled["break_reasons"].items()) or "none"
        table += [
            ("compile (aot_eager): modules compiled", f"{compiled['compiled_modules']}"),
            ("compile: graphs captured (recompiles for new shapes included)", f"{compiled['graphs']}"),
            ("compile: graph breaks", f"{compiled['graph_breaks']} ({reasons})"),
            ("compile: first step seconds (tracing included)", f"{compiled['seconds']:.0f}"),
        ]
    return table


def check_ranks_agree(results: dict[str, Any], names: list[str]) -> None:
    """Both ranks must count the same calls and collectives (times and host syncs may differ)."""
    for name in names:
        for variant in ("plain", "synced"):
            counts = [
                {k: v for k, v in results[f"{name}/{rank}"][variant].items() if k not in ("seconds", "host_syncs")}
                for rank in range(WORLD)
            ]
            if counts[0] != counts[1]:
                raise RuntimeError(f"{name} {variant}: the ranks counted differently: {counts}")


def markdown(names: list[str], tables: list[list[tuple[str, str]]], command: str) -> str:
    header = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    body = "".join(
        "| " + label + " | " + " | ".join(table[index][1] for table in tables) + " |\n"
        for index, (label, _) in enumerate(tables[0])
    )
    cpu = platform.processor() or platform.machine()
    return (
        "# Collectives per MCL training step with synchronised BatchNorm\n\n"
        f"`{command}` on {os.cpu_count()} CPU cores ({cpu}), 2 gloo processes of 1 thread, "
        f"torch {torch.__version__}, {datetime.date.today().isoformat()}.\n\n"
        f"{LEVELS} levels, `bn_groups=per_side`, FPN neck (256 channels), paper montage counts; per-rank batch "
        "after the colon. One training step = `forward_losses` through DDP + backward. Counted on rank 0 (rank 1 "
        "counts the same). torch's `nn.SyncBatchNorm` cannot run on CPU tensors: its rows are derived from the "
        "counted calls (per forward call 1 all_gather and 3 boolean-mask index ops on the gathered statistics, of "
        "which the first makes the host wait for the all_gather; per backward call 1 all_reduce). Host syncs are "
        "counted by `mcl.hostsync.HostSyncCounter` over the whole step. Step seconds: the median of the timed steps, "
        "the two ranks sharing the 2-core machine: a rough guide only.\n\n"
        + header
        + body
        + "\nBoth implementations issue one collective per train-mode BatchNorm call in the forward pass and one per "
        "online call in backward. `mcl.syncbn` sums count, sum and squared deviations in an all_reduce instead of "
        "gathering every rank's statistics, so no boolean mask is needed and the host never waits for the device; "
        "it also runs on CPU tensors (gloo) and under `torch.compile`. The extra step time of the synchronised "
        "model here is the collectives themselves: each is a rendezvous of the two ranks.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = [parse_setting(setting) for setting in DEFAULT_SETTINGS]
    parser.add_argument("--settings", nargs="+", type=parse_setting, default=defaults,
                        help=f"backbone@image_size:batch per rank (default: {' '.join(DEFAULT_SETTINGS)})")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the counted one (median)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also count the graphs and graph breaks of the compiled networks (aot_eager)")  # fmt: skip
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "collectives.md")
    args = parser.parse_args()
    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), args.settings, args.repeats, args.compile, results), nprocs=WORLD, join=True)
    results = dict(results)
    names = [f"{setting.name}:{setting.time_batch}" for setting in args.settings]
    check_ranks_agree(results, names)
    tables = [rows(results[f"{name}/0"]) for name in names]
    console = Console()
    table = Table(title=f"Collectives per training step, {LEVELS} levels, bn_groups=per_side, 2 gloo ranks")
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    for index, (label, _) in enumerate(tables[0]):
        table.add_row(label, *(rows_[index][1] for rows_ in tables))
    console.print(table)
    command = "python -m benchmarks.collectives " + " ".join(sys.argv[1:])
    args.output.write_text(markdown(names, tables, command.strip()))
    console.print(f"written to {args.output}")


if __name__ == "__main__":
    main()
