"""Figures for the released-code parity switches: the train-mode loss of one fixed batch under each BatchNorm
grouping, and the learning rate of both schedule shapes at a few steps of the 100-epoch batch-4096 recipe.

``.venv/bin/python benchmarks/parity.py [--backbone resnet50 --image-size 224 --batch 32]``; see docs/parity.md.
"""

from __future__ import annotations

import argparse

import hydra
import torch
from rich.console import Console
from rich.table import Table

from mcl.methods.mcl import BN_GROUPS
from mcl.optim import learning_rate, scaled_lr
from mcl.runtime import CONFIG_DIR

IMAGENET_TRAIN_IMAGES = 1_281_167


def official_model(backbone: str, image_size: int, bn_groups: str, seed: int):
    """``preset=official`` with ``backbone`` at ``image_size``, built from the library's configs with ``seed``."""
    overrides = ["preset=official", f"backbone={backbone}", f"image_size={image_size}", f"method.bn_groups={bn_groups}"]
    with hydra.initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra.compose("train", overrides=overrides)
    torch.manual_seed(seed)
    return hydra.utils.instantiate(cfg.method, _convert_="all")


def grouping_losses(args: argparse.Namespace) -> Table:
    torch.manual_seed(args.seed + 1)
    views = torch.randn(args.batch, 2, 4, 3, args.image_size, args.image_size)
    table = Table(
        title=f"train-mode loss of one batch: preset=official, {args.backbone}@{args.image_size}, B={args.batch}"
    )
    for column in ("bn_groups", "loss", *(f"level {level}" for level in range(4))):
        table.add_column(column, justify="right")
    for bn_groups in BN_GROUPS:
        model = official_model(args.backbone, args.image_size, bn_groups, args.seed)
        with torch.no_grad():
            loss, logs = model.forward_losses(views)  # same weights, same views, same montages (same seed)
        table.add_row(bn_groups, f"{loss.item():.4f}", *(f"{logs[f'loss_level{i}'].item():.4f}" for i in range(4)))
    return table


def schedule_values(epochs: int = 100, batch: int = 4096, warmup_epochs: int = 10) -> Table:
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // batch
    total, warmup = steps_per_epoch * epochs, steps_per_epoch * warmup_epochs
    lr = scaled_lr(1.0, batch)
    table = Table(title=f"lr, {epochs} epochs x {steps_per_epoch} steps, batch {batch}, LARS 1.0 x batch/256 = {lr:g}")
    for column in ("step", "official", "warmup_then_cosine"):
        table.add_column(column, justify="right")
    for name, step in (("0", 0), ("warmup end", warmup - 1), ("mid-run", total // 2), ("last", total - 1)):
        values = [
            learning_rate(shape, step, total, warmup, lr, 1e-4, 1e-4) for shape in ("official", "warmup_then_cosine")
        ]
        table.add_row(f"{name} ({step})", *(f"{value:.6g}" for value in values))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console = Console(width=120)
    console.print(schedule_values())
    console.print(grouping_losses(args))


if __name__ == "__main__":
    main()
