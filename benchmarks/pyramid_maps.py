"""What ``method.all_pyramid_maps`` costs: FLOPs and CPU step time of one MCL training step, switch off vs on.

``.venv/bin/python -m benchmarks.pyramid_maps --threads 1 [--repeats 5] [--preset paper|official]``; see
docs/parity.md. Not part of ``make bench``. ``--flops-only --preset official --backbone resnet50 --image-size 224
--batch 128`` counts the FLOPs of the released recipe's per-device step instead (no timing).

The model is the default config's (``mcl-train`` with no overrides: ResNet-18, 64 px, 3 levels, batch 64, 256-channel
FPN, ``preset=paper``), built from the library's configs with ``method.all_pyramid_maps`` false and true. FLOPs are
counted with :class:`torch.utils.flop_counter.FlopCounterMode` on ``meta`` tensors (the same counting as
``benchmarks/cost.py``): the online network forward and backward, the target network forward. A training step is
``forward_losses``, backward, an SGD step and the EMA update, on one fixed batch of random views; the two models take
turns step by step after a warm-up step, and the median of ``--repeats`` steps is printed.
"""

from __future__ import annotations

import argparse
import statistics

import hydra
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.cost import assemble, clock, network_flops
from mcl.methods import MCL
from mcl.runtime import CONFIG_DIR
from mcl.stepping import train_step


def default_model(all_pyramid_maps: bool, preset: str, extra: tuple[str, ...] = ()) -> tuple[MCL, int]:
    """The default config's MCL with ``preset``, the switch and ``extra`` overrides, seeded, and the config's
    per-device batch."""
    overrides = [f"preset={preset}", f"method.all_pyramid_maps={str(all_pyramid_maps).lower()}", *extra]
    with hydra.initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra.compose("train", overrides=overrides)
    torch.manual_seed(0)
    return hydra.utils.instantiate(cfg.method, _convert_="all"), cfg.batch_size


def step_flops(all_pyramid_maps: bool, preset: str, extra: tuple[str, ...] = ()) -> dict[str, int]:
    """Online (forward + backward) and target (forward) FLOPs of one step, counted on ``meta`` tensors."""
    model, batch = default_model(all_pyramid_maps, preset, extra)
    sides, _ = assemble(model, batch)
    return network_flops(model.to("meta"), sides)


class Stepper:
    """One model, its SGD optimiser and a fixed batch: times whole training steps."""

    def __init__(self, all_pyramid_maps: bool, preset: str):
        self.model, batch = default_model(all_pyramid_maps, preset)
        self.optimizer = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        size, levels = self.model.image_size, self.model.levels
        self.views = torch.randn(batch, 2, levels, 3, size, size, generator=torch.Generator().manual_seed(1))

    def step(self) -> float:
        start = clock(torch.device("cpu"))
        train_step(self.model, self.optimizer, self.views, momentum=0.99)
        return clock(torch.device("cpu")) - start


def print_flops(args: argparse.Namespace) -> None:
    """The FLOPs of one step with the switch off and on, for ``--backbone``, ``--image-size`` and ``--batch``."""
    extra = []
    if args.backbone:
        extra.append(f"backbone={args.backbone}")
    if args.image_size:
        extra.append(f"image_size={args.image_size}")
    if args.batch:
        extra.append(f"batch_size={args.batch}")
    model, batch = default_model(False, args.preset, tuple(extra))
    flops = {switch: step_flops(switch, args.preset, tuple(extra)) for switch in (False, True)}
    table = Table(
        title=f"one training step (FLOPs only), preset={args.preset}: {model.backbone.name}@{model.image_size}, "
        f"batch {batch} per device, {model.levels} levels"
    )
    for column in ("all_pyramid_maps", "online GFLOPs", "target GFLOPs", "total GFLOPs", "x"):
        table.add_column(column, justify="right")
    base = flops[False]["online_flops"] + flops[False]["target_flops"]
    for switch in (False, True):
        online, target = flops[switch]["online_flops"], flops[switch]["target_flops"]
        table.add_row(
            str(switch).lower(),
            f"{online / 1e9:.1f}",
            f"{target / 1e9:.1f}",
            f"{(online + target) / 1e9:.1f}",
            f"{(online + target) / base:.3f}",
        )
    Console(width=140).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model, after one warm-up step")
    parser.add_argument("--preset", default="paper", choices=("paper", "official"))
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs, time nothing")
    parser.add_argument("--backbone", help="with --flops-only: another backbone config (e.g. resnet50)")
    parser.add_argument("--image-size", type=int, help="with --flops-only: another view size")
    parser.add_argument("--batch", type=int, help="with --flops-only: another per-device batch")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flops_only:
        print_flops(args)
        return
    if args.backbone or args.image_size or args.batch:
        parser.error("--backbone, --image-size and --batch go with --flops-only: the timing is of the default model")
    flops = {switch: step_flops(switch, args.preset) for switch in (False, True)}
    steppers = {switch: Stepper(switch, args.preset) for switch in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for round_index in range(1 + args.repeats):
        for switch, stepper in steppers.items():
            seconds = stepper.step()
            if round_index:
                times[switch].append(seconds)
    model = steppers[False].model
    table = Table(
        title=f"one training step, default config (preset={args.preset}): {model.backbone.name}@{model.image_size}, "
        f"batch {len(steppers[False].views)}, {model.levels} levels, CPU, {torch.get_num_threads()} thread(s), "
        f"median of {args.repeats}"
    )
    for column in ("all_pyramid_maps", "online GFLOPs", "target GFLOPs", "total GFLOPs", "x", "step s", "x"):
        table.add_column(column, justify="right")
    base_total = flops[False]["online_flops"] + flops[False]["target_flops"]
    base_time = statistics.median(times[False])
    for switch in (False, True):
        online, target = flops[switch]["online_flops"], flops[switch]["target_flops"]
        median = statistics.median(times[switch])
        table.add_row(
            str(switch).lower(),
            f"{online / 1e9:.2f}",
            f"{target / 1e9:.2f}",
            f"{(online + target) / 1e9:.2f}",
            f"{(online + target) / base_total:.3f}",
            f"{median:.3f}",
            f"{median / base_time:.3f}",
        )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
