"""Necks that turn C2..C5 into the 256-channel pyramid map each montage level reads.

Which map a level reads, at what stride, is the neck's :class:`~mcl.geometry.LevelGeometry` (its ``geometry``):
with the FPN, level ``i`` reads ``P(5-i)``: level 0 -> P5, 1 -> P4, 2 -> P3, 3 -> P2. A neck is asked for the maps
of images ordered by level and computes only what each level needs (``forward_levels``), so level-0 views never pay
for P2..P4. ``forward_all`` computes every map the neck has for every image instead, as the released code does
(``method.all_pyramid_maps``, see docs/parity.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from mcl.geometry import neck_geometry, stage_index

NECKS = ("fpn", "interp")


def check_level_counts(counts: Sequence[int], available: int) -> None:
    if not 1 <= len(counts) <= available:
        raise ValueError(
            f"{len(counts)} montage levels need pyramid maps this neck was not built with (levels too small)"
        )


class PartialFPN(FeaturePyramidNetwork):
    """torchvision's FPN with BatchNorm (no P6) that computes only the maps montage levels read.

    With ``levels`` montage levels only the maps they read are built: P5..P(6-levels) (``stages``, finest first),
    fed by the matching C stages, so no parameter goes unused (4 levels: P2..P5). :meth:`forward_levels` takes the
    features of images ordered by montage level and runs each lateral conv once, on the images whose map needs it,
    and each output conv once, on the images of the level that reads it. ``forward`` is torchvision's (on
    :meth:`stage_features`) and gives the same maps in eval mode.
    """

    geometry = neck_geometry("fpn")

    def __init__(self, in_channels: list[int], out_channels: int = 256, levels: int = 4):
        self.stages = self.geometry.stages(levels)
        super().__init__(self.stage_features(in_channels), out_channels, norm_layer=nn.BatchNorm2d)
        self.out_channels = out_channels

    def stage_features(self, features: Sequence[Any]) -> list[Any]:
        """The entries of ``features`` (``[C2, C3, C4, C5]``, or their widths) for the stages this FPN reads,
        finest first (its blocks' order)."""
        return [features[stage_index(stage)] for stage in self.stages]

    def block(self, level: int) -> int:
        """The index of the lateral and output convs (and of the :meth:`stage_features` entry) of the map montage
        ``level`` reads."""
        return self.stages.index(self.geometry.stage(level))

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
        features = self.stage_features(features)
        check_level_counts(counts, len(self.stages))
        top = self.block(0)
        inner = self.get_result_from_inner_blocks(features[top], top)
        maps, start = [], 0
        for level, count in enumerate(counts):
            index = self.block(level)
            if level:
                lateral = self.get_result_from_inner_blocks(features[index][start:], index)
                inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            maps.append(self.get_result_from_layer_blocks(inner[:count], index))
            inner, start = inner[count:], start + count
        return maps

    def forward_all(self, features: list[torch.Tensor], levels: int) -> list[torch.Tensor]:
        """Every map this FPN builds, of every image: torchvision's ``forward``, ordered by the montage level that
        reads each map.

        Args:
            features: ``[C2, C3, C4, C5]`` of ``N`` images.
            levels: montage levels ``0..levels-1`` (at most the levels the FPN was built for).

        Returns:
            Per level ``i``, ``(N, out_channels, H/2**(5-i), W/2**(5-i))``: ``P(5-i)`` of every image. Each lateral
            and output conv runs once, over all ``N`` images, so its BatchNorm normalises over all of them (the
            released code's FPN, which builds P2..P5 for every image).
        """
        check_level_counts(range(levels), len(self.stages))
        maps = list(self(dict(enumerate(self.stage_features(features)))).values())  # torchvision's order: finest first
        return [maps[self.block(level)] for level in range(levels)]


# The C stages the interp neck can read (``neck.stage``): C5 (the default) or C4, the C4 detectors' feature map.
INTERP_STAGES = (4, 5)


def interp_min_image_size(stage: int, levels: int) -> int:
    """The smallest montage side the ``interp`` neck on C``stage`` accepts with ``levels`` levels: with more than
    one level its source map must have 2x2 cells or more, since a 1x1 map resized to any size is one value and every
    tile of levels 1.. would get the same feature (0: no bound, one level reads the map as it is)."""
    return 2 * neck_geometry("interp", stage).stride(0) if levels > 1 else 0


class InterpolationNeck(nn.Module):
    """For single-level (C4-style) detectors: a 1x1 conv + BN on one C stage, bilinearly resized per level.

    Level ``i``'s map has the size of ``C(stage - i)`` (``geometry``, :func:`~mcl.geometry.neck_geometry`).
    ``stage=5`` (the default): the conv reads C5 and level ``i``'s map has the size of ``P(5-i)`` (stride
    ``32 / 2**i``), as the FPN's, so tiles are ``H/32``. ``stage=4``: the conv reads C4 and level ``i``'s map has
    stride ``16 / 2**i`` (level 0 reads C4 at its own resolution, as a C4 detector pools its RoIs), so tiles are
    ``H/16`` and the tile head runs on 4 times the positions; levels 1..3 only (a 4th level would need a stride-2 map).
    With ``stage=4`` the loss does not reach ``layer4``: res5 keeps its initial weights (see docs/transfer.md).
    """

    def __init__(
        self, in_channels: list[int], out_channels: int = 256, levels: int = 4, stage: int = 5, image_size: int = 0
    ):
        super().__init__()
        if stage not in INTERP_STAGES:
            raise ValueError(f"neck.stage={stage!r} is invalid: use 5 (resize C5, the default) or 4 (resize C4)")
        if 0 < image_size < interp_min_image_size(stage, levels):
            raise ValueError(
                f"neck.stage={stage} with image_size={image_size} and levels={levels} is invalid: C{stage} is 1x1, so "
                f"every tile of levels 1..{levels - 1} would get the same feature; use "
                f"image_size>={interp_min_image_size(stage, levels)}"
                + (", or neck.stage=4 (C4 is 2x2 at 32 px)" if stage == 5 and image_size >= 32 else "")
                + ", or levels=1"
            )
        self.geometry = neck_geometry("interp", stage)
        if levels > self.geometry.max_levels:
            finest = self.geometry.max_levels - 1
            raise ValueError(
                f"neck.stage={stage} with levels={levels} is invalid: level i reads a map of stride "
                f"{self.geometry.stride(0)}/2**i, and level {finest} already reads the finest, "
                f"{self.geometry.map_name(finest)} at stride {self.geometry.stride(finest)}; use "
                f"levels<={self.geometry.max_levels} or neck.stage=5"
            )
        self.out_channels = out_channels
        self.stage = stage
        self.reduce = Conv2dNormActivation(
            in_channels[self.geometry.feature_index(0)],
            out_channels,
            kernel_size=1,
            norm_layer=nn.BatchNorm2d,
            activation_layer=None,
        )

    def forward_levels(self, features: list[torch.Tensor], counts: Sequence[int]) -> list[torch.Tensor]:
        """As :meth:`PartialFPN.forward_levels`: one reduction over all images, then each level resized.

        Per level ``i``, ``(counts[i], out_channels, H/s, W/s)`` with ``s = 2**(stage - i)``: ``stage=5`` gives the
        sizes of ``P(5-i)``, ``stage=4`` those of ``C(4-i)``.
        """
        check_level_counts(counts, self.geometry.max_levels)
        reduced = self.reduce(features[self.geometry.feature_index(0)]).split(list(counts))
        return [self.resized(level_map, features, level) for level, level_map in enumerate(reduced)]

    def forward_all(self, features: list[torch.Tensor], levels: int) -> list[torch.Tensor]:
        """As :meth:`PartialFPN.forward_all`: the reduction of every image, resized to the size of each level
        ``0..levels-1``."""
        check_level_counts(range(levels), self.geometry.max_levels)
        reduced = self.reduce(features[self.geometry.feature_index(0)])
        return [self.resized(reduced, features, level) for level in range(levels)]

    def resized(self, level_map: torch.Tensor, features: list[torch.Tensor], level: int) -> torch.Tensor:
        """``level_map`` bilinearly resized to the size of montage ``level``'s map (unchanged if it has it)."""
        size = features[self.geometry.feature_index(level)].shape[-2:]
        if level_map.shape[-2:] == size:
            return level_map
        return F.interpolate(level_map, size=size, mode="bilinear", align_corners=False)


def build_neck(
    name: str, in_channels: list[int], out_channels: int = 256, levels: int = 4, image_size: int = 0, **options
) -> nn.Module:
    """The neck ``name`` for C2..C5 with ``in_channels``, serving montage levels ``0..levels-1`` of montages of side
    ``image_size`` (0: unknown, not checked); ``options`` are the neck's own keys (``stage`` for ``interp``)."""
    if name == "fpn":
        if options:
            raise ValueError(f"neck.name=fpn takes no {sorted(options)}: those keys are for other necks")
        return PartialFPN(in_channels, out_channels, levels)
    if name == "interp":
        return InterpolationNeck(in_channels, out_channels, levels, image_size=image_size, **options)
    raise ValueError(f"neck.name={name!r} is invalid: use one of {NECKS}")
