"""The montage -> backbone -> pyramid -> tile head path that every multi-level method shares: cell features of
montages grouped by level, computed as the loss reads them (:func:`level_cells`) or as the released code computes
them, every map of every image (:func:`all_map_cells`, then :func:`own_cells`). No Lightning."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mcl.backbones import Backbone, pool
from mcl.geometry import cell_count, grid_side
from mcl.heads import TileHead, split_tiles


def level_cells(
    images: Sequence[torch.Tensor],
    backbone: Backbone,
    neck: nn.Module,
    head: TileHead,
    embedded_levels: int | None = None,
    head_per_level: bool = True,
    pooled: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Embed every cell of montages grouped by level, with one backbone pass over all of them.

    Args:
        images: per level ``i = 0, 1, ...``, ``(M_i, C, H, W)`` montages (level 0: plain views); all share ``H x W``.
            They share the backbone's BatchNorm statistics; the neck's are shared by the images that need each map.
        embedded_levels: embed only levels ``0..embedded_levels-1``; the others still take part in the backbone's
            statistics (the released code's target network sees the montages but keeps only level 0). All by default.
        head_per_level: one head call per level (BatchNorm statistics per level, as the released code's head runs
            per pyramid level) or one call over the tiles of all levels.
        pooled: a list that receives the pooled C5 of the level-0 images, detached (:func:`take_level_zero`).

    Returns:
        Per embedded level, ``(M_i * 4**i, head channels)`` cell features in ``sources.flatten()`` order.
    """
    features = backbone(torch.cat(list(images)))
    take_level_zero(features, len(images[0]), pooled)
    counts = [len(level_images) for level_images in images[:embedded_levels]]
    maps = neck.forward_levels([f[: sum(counts)] for f in features], counts)
    tiles = [split_tiles(level_map, grid_side(level)) for level, level_map in enumerate(maps)]
    if head_per_level:
        return [head(level_tiles) for level_tiles in tiles]
    return list(head(torch.cat(tiles)).split([len(t) for t in tiles]))


def take_level_zero(features: Sequence[torch.Tensor], count: int, pooled: list[torch.Tensor] | None) -> None:
    """Append to ``pooled`` (unless ``None``) the pooled C5 of the first ``count`` images of a backbone pass (the
    level-0 images: the images are ordered by level), detached: the online linear probe's input
    (:mod:`mcl.online_probe`), taken from the pass the loss needs rather than from another one."""
    if pooled is not None:
        pooled.append(pool(features[-1][:count].detach()))


def all_map_cells(
    images: Sequence[torch.Tensor],
    backbone: Backbone,
    neck: nn.Module,
    head: TileHead,
    pooled: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Embed every tile of every pyramid map of every image, as the released code does (``all_pyramid_maps``).

    Args:
        images: per level ``i = 0, 1, ...``, ``(M_i, C, H, W)`` montages (level 0: plain views); all share ``H x W``.
            One backbone pass over all ``N = sum(M_i)`` of them.
        pooled: as :func:`level_cells` takes it.

    Returns:
        Per level ``i``, ``(N * 4**i, head channels)``: the head features of level ``i``'s map (``P(5-i)`` with the
        FPN) of all ``N`` images, each map cut into level ``i``'s ``2**i x 2**i`` grid, image by image
        (``sources.flatten()`` order within each).
        The neck computes every map of every image (``neck.forward_all``) and the head runs once per map over all of
        its tiles, the finest map first (the released head's order, which fixes how its running statistics are
        updated). :func:`own_cells` keeps the cells the loss reads.
    """
    features = backbone(torch.cat(list(images)))
    take_level_zero(features, len(images[0]), pooled)
    maps = neck.forward_all(features, len(images))
    cells: dict[int, torch.Tensor] = {}
    for level in reversed(range(len(maps))):
        cells[level] = head(split_tiles(maps[level], grid_side(level)))
    return [cells[level] for level in range(len(maps))]


def own_cells(per_map: Sequence[torch.Tensor], counts: Sequence[int]) -> list[torch.Tensor]:
    """Per level ``i < len(counts)``, the rows of level ``i``'s own images in ``per_map[i]``.

    Args:
        per_map: per level ``i``, ``(N * 4**i, ...)`` rows of all ``N`` images (as :func:`all_map_cells` returns
            them), the images ordered by level.
        counts: images per level, ``M_0, M_1, ...`` (fewer than the levels of ``per_map`` to keep the first ones).

    Returns:
        Per level ``i``, ``(M_i * 4**i, ...)``: the same cells as :func:`level_cells` gives, in the same order.
    """
    kept, start = [], 0
    for level, count in enumerate(counts):
        cells = cell_count(level)
        kept.append(per_map[level][start * cells : (start + count) * cells])
        start += count
    return kept
