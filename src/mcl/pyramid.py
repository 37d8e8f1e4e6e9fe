"""Necks that turn C2..C5 into the 256-channel pyramid map each montage level reads.

Montage level ``i`` reads pyramid level ``P(5-i)``: level 0 -> P5, 1 -> P4, 2 -> P3, 3 -> P2. A neck is asked
for the maps of images ordered by level and computes only what each level needs, so level-0 views never pay for
P2..P4.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

NECKS = ("fpn", "interp")


def pyramid_index(level: int) -> int:
    """Index into ``[P2, P3, P4, P5]`` of the map that montage ``level`` reads."""
    return 3 - level


def check_level_counts(counts: Sequence[int], available: int) -> None:
    if not 1 <= len(counts) <= available:
        raise ValueError(
            f"{len(counts)} montage levels need pyramid maps this neck was not built with (levels too small)"
        )


class PartialFPN(FeaturePyramidNetwork):
    """torchvision's FPN with BatchNorm (no P6) that computes only the maps montage levels read.

    With ``levels`` montage levels only the finest map they read is built: P5..P(6-levels), fed by the matching
    C stages, so no parameter goes unused (4 levels: P2..P5). :meth:`forward_levels` takes the features of images
    ordered by montage level and runs each lateral conv once, on the images whose map needs it, and each output
    conv once, on the images of the level that reads it. ``forward`` is torchvision's (on ``features[4 - levels:]``)
    and gives the same maps in eval mode.
    """

    def __init__(self, in_channels: list[int], out_channels: int = 256, levels: int = 4):
        self.first_stage = len(in_channels) - levels
        super().__init__(in_channels[self.first_stage :], out_channels, norm_layer=nn.BatchNorm2d)
        self.out_channels = out_channels

    def forward_levels(self, features: list[torch.Tensor], counts: Sequence[int]) -> list[torch.Tensor]:
        """Per-level pyramid maps of images ordered by montage level.

        Args:
            features: ``[C2, C3, C4, C5]`` of ``sum(counts)`` images: ``counts[0]`` of level 0, then level 1, ...
            counts: images per level, for levels ``0..len(counts)-1``.

        Returns:
            Per level ``i``, ``(counts[i], out_channels, H/2**(5-i), W/2**(5-i))``: the map ``P(5-i)`` it reads.
            Level ``i``'s images are a suffix of those that need the lateral of ``C(5-i)``, so the top-down path
            slices rather than recomputes.
        """
        features = features[self.first_stage :]
        last = len(features) - 1
        check_level_counts(counts, last + 1)
        inner = self.get_result_from_inner_blocks(features[last], last)
        maps, start = [], 0
        for level, count in enumerate(counts):
            index = last - level
            if level:
                lateral = self.get_result_from_inner_blocks(features[index][start:], index)
                inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            maps.append(self.get_result_from_layer_blocks(inner[:count], index))
            inner, start = inner[count:], start + count
        return maps


class InterpolationNeck(nn.Module):
    """For single-level (C4-style) detectors: a 1x1 conv + BN on C5, bilinearly resized to the level's map size."""

    def __init__(self, in_channels: list[int], out_channels: int = 256, levels: int = 4):
        super().__init__()
        self.out_channels = out_channels
        self.reduce = Conv2dNormActivation(
            in_channels[-1], out_channels, kernel_size=1, norm_layer=nn.BatchNorm2d, activation_layer=None
        )

    def forward_levels(self, features: list[torch.Tensor], counts: Sequence[int]) -> list[torch.Tensor]:
        """As :meth:`PartialFPN.forward_levels`: one reduction over all images, then each level resized."""
        check_level_counts(counts, len(features))
        reduced = self.reduce(features[-1]).split(list(counts))
        maps = []
        for level, level_map in enumerate(reduced):
            size = features[pyramid_index(level)].shape[-2:]
            same = level_map.shape[-2:] == size
            maps.append(
                level_map if same else F.interpolate(level_map, size=size, mode="bilinear", align_corners=False)
            )
        return maps


def build_neck(name: str, in_channels: list[int], out_channels: int = 256, levels: int = 4) -> nn.Module:
    """The neck ``name`` for C2..C5 with ``in_channels``, serving montage levels ``0..levels-1``."""
    if name == "fpn":
        return PartialFPN(in_channels, out_channels, levels)
    if name == "interp":
        return InterpolationNeck(in_channels, out_channels, levels)
    raise ValueError(f"neck.name={name!r} is invalid: use one of {NECKS}")
