"""Figures for the released-code parity switches: the train-mode forward of one fixed batch against the released
code's (reimplemented here on the library's modules), the loss under each BatchNorm grouping, and the learning rate
of both schedule shapes at a few steps of the 100-epoch batch-4096 recipe.

``.venv/bin/python benchmarks/parity.py [--backbone resnet50 --image-size 224 --batch 32]``; see docs/parity.md.
The reference forward (:func:`released_forward`) is also what ``tests/test_released_forward.py`` checks the library
against.
"""

from __future__ import annotations

import argparse

import hydra
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from mcl.methods.bn_groups import BN_GROUPS
from mcl.methods.mcl import MCL
from mcl.optim import learning_rate, scaled_lr
from mcl.runtime import CONFIG_DIR
from mcl.sides import cell_sources

IMAGENET_TRAIN_IMAGES = 1_281_167


def official_model(backbone: str, image_size: int, seed: int, bn_groups: str = "per_side", all_maps: bool = True):
    """``preset=official`` with ``backbone`` at ``image_size``, ``method.bn_groups`` and ``method.all_pyramid_maps``,
    built from the library's configs with ``seed``."""
    overrides = [
        "preset=official",
        f"backbone={backbone}",
        f"image_size={image_size}",
        f"method.bn_groups={bn_groups}",
        f"method.all_pyramid_maps={str(all_maps).lower()}",
    ]
    with hydra.initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra.compose("train", overrides=overrides)
    torch.manual_seed(seed)
    return hydra.utils.instantiate(cfg.method, _convert_="all")


# ------------------------------------------------------------------------------- the released forward
# The released code's MCL.forward_train (GuoQiushan/MCL, on OpenSelfSup and mmdet), written from its formulas on the
# library's modules: the same weights, another implementation of the passes.


def released_fpn(neck, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """mmdet's ``FPN.forward`` on the library's lateral (``inner_blocks``, 1x1 conv + BN) and output
    (``layer_blocks``, 3x3 conv + BN) convs: every lateral over all images, the nearest top-down sums, every output
    conv over all images; the maps finest first (P2..P5 with 4 levels)."""
    laterals = [lateral(x) for lateral, x in zip(neck.inner_blocks, neck.stage_features(features), strict=True)]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    return [output(lateral) for output, lateral in zip(neck.layer_blocks, laterals, strict=True)]


def released_encoder(network, images: torch.Tensor, tile: int) -> list[torch.Tensor]:
    """``encoder(img)`` = backbone -> FPN -> ``DetConvGpNonLinearHead.forward``: per map, finest first, the map of
    every image cut into ``tile x tile`` tiles (``reshape(N, c, n, t, n, t).permute(0, 2, 4, 1, 3, 5)``), the
    stacked convs, ``tile x tile`` average pooling and the projector MLP over all tiles of the map; ``(N, n * n, D)``
    per map."""
    backbone, neck, head, projector = network
    feats = []
    for x in released_fpn(neck, backbone(images)):
        n, c, height, width = x.shape
        n_h, n_w = height // tile, width // tile
        tiles = x.reshape(n, c, n_h, tile, n_w, tile).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, tile, tile)
        pooled = F.avg_pool2d(head.convs(tiles), tile, stride=tile).reshape(-1, c)
        feats.append(projector(pooled).reshape(n, n_h * n_w, -1))
    return feats


def released_forward(
    model: MCL, views: torch.Tensor, montages: list
) -> tuple[torch.Tensor, list[torch.Tensor], dict[tuple[int, int], torch.Tensor]]:
    """The released ``forward_train`` on ``views`` ``(B, 2, levels, C, H, W)`` with the cells of the library's
    ``montages`` (``montages[side]`` from ``model.build_montages``) at levels 1..; level 0 is each side's plain views
    in batch order, as there.

    Per side, the online and then the target encoder run on ``cat(plain views, montages of levels 1..)``; level ``i``
    reads map ``-(i + 1)`` (``P(5-i)``) of its own images (rows ``img_num_idx[i-1]:img_num_idx[i]``); the targets
    are the target network's normalised P5 embeddings of the plain views (rows ``:B``);
    ``LatentMultiPredictContrastHead``: predictor ``i``, normalised, cosine logits against the other side's targets,
    ``cross_entropy(logits / T, labels) * 2T * w_i``, summed over both sides (q against k's targets, then k against
    q's) and all levels.

    Returns:
        The total loss, the per-level loss (both sides, unweighted, as the library logs it) and
        ``{(side, level): predictions}`` in the released row order (level 0: batch order).
    """
    batch, tile = len(views), model.image_size // 32
    weights, temperature = model.loss.level_weights, model.loss.temperature
    images, labels = [], []
    for side in (0, 1):
        images.append(torch.cat([views[:, side, 0], *(m for m, _ in montages[side][1:])]))
        labels.append([torch.arange(batch, device=views.device), *(s.flatten() for _, s in montages[side][1:])])
    ends = torch.cumsum(torch.tensor([batch] + [len(m) for m, _ in montages[0][1:]]), 0).tolist()
    online = [released_encoder(model.online, images[side], tile) for side in (0, 1)]
    with torch.no_grad():
        target = [released_encoder(model.target, images[side], tile) for side in (0, 1)]
    targets = [F.normalize(target[side][-1][:batch].reshape(batch, -1), dim=1) for side in (0, 1)]
    total, level_losses, predictions = views.new_zeros(()), [], {}
    for level in range(len(ends)):
        start, end = (0 if level == 0 else ends[level - 1]), ends[level]
        level_loss = views.new_zeros(())
        for side in (0, 1):
            cells = online[side][-(level + 1)][start:end]
            predictions[side, level] = model.predictors[level](cells.reshape(-1, cells.shape[-1]))
            logits = F.normalize(predictions[side, level], dim=1) @ targets[1 - side].T
            level_loss = level_loss + F.cross_entropy(logits / temperature, labels[side][level]) * (2 * temperature)
        level_losses.append(level_loss)
        total = total + weights[level] * level_loss
    return total, level_losses, predictions


def library_forward(model: MCL, views: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict, list, dict]:
    """The library's training forward (what ``forward_losses`` runs: online pass, target pass, loss) on montages
    drawn from ``seed``: the loss, its logs, the montages and the online predictions."""
    model.seed_montages(seed)
    montages = [model.build_montages(views[:, side]) for side in (0, 1)]
    predictions = model.online_pass(montages)
    targets, present = model.target_pass(views, montages)
    loss, logs = model.loss(predictions, cell_sources(montages), targets, present)
    return loss, logs, montages, predictions


def aligned(predictions: dict, montages: list) -> dict:
    """Released-order predictions in the library's row order: level 0 permuted by the library's plain-view order."""
    return {
        (side, level): value[montages[side][0][1].flatten()] if level == 0 else value
        for (side, level), value in predictions.items()
    }


def released_comparison(args: argparse.Namespace) -> Table:
    """The loss and predictions of the library, ``all_pyramid_maps`` off and on, against the released forward."""
    torch.manual_seed(args.seed + 1)
    views = torch.randn(args.batch, 2, 4, 3, args.image_size, args.image_size)
    title = (
        f"train-mode forward vs the released code's: preset=official, {args.backbone}@{args.image_size}, B={args.batch}"
    )
    table = Table(title=title)
    for column in ("forward", "loss", *(f"level {level}" for level in range(4)), "max |d pred| per level"):
        table.add_column(column, justify="right")
    released = official_model(args.backbone, args.image_size, args.seed)
    library = {
        all_maps: official_model(args.backbone, args.image_size, args.seed, all_maps=all_maps)
        for all_maps in (False, True)
    }
    with torch.no_grad():
        runs = {all_maps: library_forward(model, views, args.seed) for all_maps, model in library.items()}
        montages = runs[True][2]
        expected, expected_levels, expected_predictions = released_forward(released, views, montages)
    table.add_row("released", f"{expected.item():.4f}", *(f"{v.item():.4f}" for v in expected_levels), "-")
    reference = aligned(expected_predictions, montages)
    for all_maps, (loss, logs, _, predictions) in runs.items():
        gaps = [
            max((predictions[side, level] - reference[side, level]).abs().max().item() for side in (0, 1))
            for level in range(4)
        ]
        table.add_row(
            f"all_pyramid_maps={str(all_maps).lower()}",
            f"{loss.item():.4f}",
            *(f"{logs[f'loss_level{i}'].item():.4f}" for i in range(4)),
            " ".join(f"{gap:.2g}" for gap in gaps),
        )
    return table


def grouping_losses(args: argparse.Namespace) -> Table:
    """The train-mode loss of one batch under each ``method.bn_groups`` (``all_pyramid_maps`` off), and under
    ``per_side`` with it on (``preset=official``)."""
    torch.manual_seed(args.seed + 1)
    views = torch.randn(args.batch, 2, 4, 3, args.image_size, args.image_size)
    table = Table(
        title=f"train-mode loss of one batch: preset=official, {args.backbone}@{args.image_size}, B={args.batch}"
    )
    for column in ("bn_groups", "all_pyramid_maps", "loss", *(f"level {level}" for level in range(4))):
        table.add_column(column, justify="right")
    for bn_groups, all_maps in [*((groups, False) for groups in BN_GROUPS), ("per_side", True)]:
        model = official_model(args.backbone, args.image_size, args.seed, bn_groups, all_maps)
        with torch.no_grad():
            loss, logs = model.forward_losses(views)  # same weights, same views, same montages (same seed)
        table.add_row(
            bn_groups,
            str(all_maps).lower(),
            f"{loss.item():.4f}",
            *(f"{logs[f'loss_level{i}'].item():.4f}" for i in range(4)),
        )
    return table


def schedule_values(epochs: int = 100, batch: int = 4096, warmup: int = 3127) -> Table:
    """The lr of both shapes with the recipe's ``scheduler.warmup_steps`` (the released 3127 iterations)."""
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // batch
    total = steps_per_epoch * epochs
    lr = scaled_lr(1.0, batch)
    table = Table(
        title=f"lr, {epochs} epochs x {steps_per_epoch} steps, {warmup} warmup steps, batch {batch}, "
        f"LARS 1.0 x batch/256 = {lr:g}"
    )
    for column in ("step", "official", "warmup_then_cosine"):
        table.add_column(column, justify="right")
    for name, step in (
        ("0", 0),
        ("warmup end", warmup - 1),
        ("after warmup", warmup),
        ("mid-run", total // 2),
        ("last", total - 1),
    ):
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
    console.print(released_comparison(args))
    console.print(grouping_losses(args))


if __name__ == "__main__":
    main()
