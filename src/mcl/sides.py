"""The self-supervised method's data: two augmentation sides, each with its montages per level, and the tensors of a
training step keyed by ``(side, level)``. No Lightning."""

from __future__ import annotations

from collections.abc import Mapping

import torch

# The two augmentation sides of a self-supervised training step.
SIDES = (0, 1)
# Tensors of a training step keyed by ``(side, level)``.
BySideLevel = dict[tuple[int, int], torch.Tensor]
# One side's montages per level, as ``build_montages`` returns them: ``(montages (M, C, H, W), sources (M, g, g))``.
SideMontages = list[tuple[torch.Tensor, torch.Tensor]]


def montage_images(montages: list[SideMontages]) -> list[list[torch.Tensor]]:
    """``images[side][level]`` ``(M, C, H, W)``: each side's montages without their sources."""
    return [[level_montages for level_montages, _ in side] for side in montages]


def cell_sources(montages: list[SideMontages]) -> BySideLevel:
    """The batch index of every cell's image, ``(M * 4**level,)`` in ``sources.flatten()`` order, keyed by
    ``(side, level)``."""
    return {
        (side, level): sources.flatten()
        for side, side_montages in zip(SIDES, montages, strict=True)
        for level, (_, sources) in enumerate(side_montages)
    }


def split_sides(joined: torch.Tensor, sizes: list[int], level: int) -> BySideLevel:
    """Rows of both sides, side 0 first, as ``{(side, level): rows}``."""
    return {(side, level): rows for side, rows in zip(SIDES, joined.split(sizes), strict=True)}


def check_side_level_keys(name: str, tensors: Mapping[tuple[int, int], torch.Tensor], levels: range) -> None:
    """Fail unless ``tensors`` holds exactly one tensor per ``(side, level)`` for both sides and ``levels``."""
    expected = {(side, level) for side in SIDES for level in levels}
    if set(tensors) != expected:
        raise ValueError(
            f"{name} are keyed {sorted(tensors)}, but this loss needs (side, level) keys {sorted(expected)}"
        )
