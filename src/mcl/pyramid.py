"""Necks that turn C2..C5 into the 256-channel pyramid map each montage level reads (SPEC §2, §4).

Montage level ``i`` reads pyramid level ``P(5-i)``: level 0 -> P5, 1 -> P4, 2 -> P3, 3 -> P2. A neck is asked for
one level at a time and computes only what that level needs, so level-0 views never pay for P2..P4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

NECKS = ("fpn", "interp")


def pyramid_index(level: int) -> int:
    """Index into ``[P2, P3, P4, P5]`` of the map that montage ``level`` reads."""
    return 3 - level


class PartialFPN(FeaturePyramidNetwork):
    """torchvision's FPN with BatchNorm (no P6) that can compute a single output level.

    With ``levels`` montage levels only the finest map they read is built: P5..P(6-levels), fed by the matching
    C stages, so no parameter goes unused (4 levels: P2..P5). ``forward_level(features, level)`` runs the top-down
    path only from C5 down to the level's map and applies only that level's 3x3 output conv; ``forward`` is
    torchvision's (on ``features[4 - levels:]``) and gives the same maps.
    """

    def __init__(self, in_channels: list[int], out_channels: int = 256, levels: int = 4):
        self.first_stage = len(in_channels) - levels
        super().__init__(in_channels[self.first_stage :], out_channels, norm_layer=nn.BatchNorm2d)
        self.out_channels = out_channels

    def forward_level(self, features: list[torch.Tensor], level: int) -> torch.Tensor:
        """``features`` ``[C2, C3, C4, C5]`` -> ``(B, out_channels, H/2**(5-level), W/2**(5-level))``."""
        features = features[self.first_stage :]
        target = pyramid_index(level) - self.first_stage
        if target < 0:
            raise ValueError(f"level {level} needs a pyramid map this FPN was not built with (levels too small)")
        last = len(features) - 1
        inner = self.get_result_from_inner_blocks(features[last], last)
        for index in range(last - 1, target - 1, -1):
            lateral = self.get_result_from_inner_blocks(features[index], index)
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
        return self.get_result_from_layer_blocks(inner, target)


class InterpolationNeck(nn.Module):
    """For single-level (C4-style) detectors: a 1x1 conv + BN on C5, bilinearly resized to the level's map size."""

    def __init__(self, in_channels: list[int], out_channels: int = 256, levels: int = 4):
        super().__init__()
        self.out_channels = out_channels
        self.reduce = Conv2dNormActivation(
            in_channels[-1], out_channels, kernel_size=1, norm_layer=nn.BatchNorm2d, activation_layer=None
        )

    def forward_level(self, features: list[torch.Tensor], level: int) -> torch.Tensor:
        reduced = self.reduce(features[-1])
        size = features[pyramid_index(level)].shape[-2:]
        if reduced.shape[-2:] == size:
            return reduced
        return F.interpolate(reduced, size=size, mode="bilinear", align_corners=False)


def build_neck(name: str, in_channels: list[int], out_channels: int = 256, levels: int = 4) -> nn.Module:
    """The neck ``name`` for C2..C5 with ``in_channels``, serving montage levels ``0..levels-1``."""
    if name == "fpn":
        return PartialFPN(in_channels, out_channels, levels)
    if name == "interp":
        return InterpolationNeck(in_channels, out_channels, levels)
    raise ValueError(f"neck.name={name!r} is invalid: use one of {NECKS}")
