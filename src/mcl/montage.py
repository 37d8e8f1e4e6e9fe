"""Montage assembly: downscaled views tiled into full-size images.

Level ``i`` downscales every view by ``2**i`` and tiles ``4**i`` of them into a ``2**i x 2**i`` grid
(:func:`mcl.geometry.grid_side`), so each montage has the size of the original view. ``sources`` records, row-major,
which batch image fills each cell; it is what the loss uses to find each cell's positive.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mcl.geometry import MAX_LEVELS, STAGES, grid_side

DOWNSCALE_MODES = ("nearest", "area", "bilinear")
MONTAGE_RULES = ("paper", "official")
# The released code's montage counts for 4 levels, as fractions of the batch: B, B/4, B/16, B/32.
OFFICIAL_MONTAGE_DIVISORS = (1, 4, 16, 32)


def check_levels(levels: int) -> int:
    """Return ``levels`` if it is an int in 1..``MAX_LEVELS`` (4), else raise a ValueError naming the key."""
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= MAX_LEVELS:
        raise ValueError(
            f"levels={levels!r} is invalid: the number of montage levels must be an integer in 1..{MAX_LEVELS} "
            f"(level i is read from pyramid level P(5-i), and the pyramid has P{STAGES[0]}..P{STAGES[-1]})"
        )
    return levels


# The axis of a training batch's views that holds one view per level, per ``data.view_mode``: ``byol`` views are
# ``(B, 2, L, C, H, W)`` (two augmentation sides), ``supervised`` views ``(B, L, C, H, W)``.
LEVEL_AXIS = {"byol": 2, "supervised": 1}


def check_views(views: torch.Tensor, levels: int, image_size: int, view_mode: str) -> None:
    """Fail early when a batch's views do not match the model: one view per level (along the ``view_mode``'s
    :data:`LEVEL_AXIS`) of ``image_size`` pixels."""
    level_axis = LEVEL_AXIS[view_mode]
    if views.ndim != level_axis + 4:
        raise ValueError(
            f"the batch's views have shape {tuple(views.shape)}, but this method trains on data.view_mode="
            f"{view_mode} views of {level_axis + 4} dimensions; set data.view_mode={view_mode}"
        )
    if views.shape[level_axis] != levels:
        raise ValueError(
            f"the batch has {views.shape[level_axis]} views per side but levels={levels}; "
            "set data.views_per_side to the level count (the default configs interpolate it)"
        )
    if views.shape[-2:] != (image_size, image_size):
        raise ValueError(
            f"batch views are {views.shape[-2]}x{views.shape[-1]} but the model was built for "
            f"image_size={image_size}; set data.image_size and image_size alike"
        )


def montage_counts(rule: str | Sequence[int], batch_size: int, levels: int) -> list[int]:
    """Number of montages per level for a per-device batch of ``batch_size`` views.

    ``rule`` is ``"paper"`` (``B / 4**i``, at least 1), ``"official"`` (``B, B/4, B/16, B/32``, at least 1) or an
    explicit list with one positive count per level.
    """
    check_levels(levels)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: it must be at least 1")
    if isinstance(rule, str):
        if rule == "paper":
            return [max(1, batch_size // 4**level) for level in range(levels)]
        if rule == "official":
            if levels > len(OFFICIAL_MONTAGE_DIVISORS):
                raise ValueError(
                    f"montage_counts=official has counts for {len(OFFICIAL_MONTAGE_DIVISORS)} levels (B, B/4, B/16, "
                    f"B/32), not levels={levels}: give a list of {levels} counts"
                )
            return [max(1, batch_size // divisor) for divisor in OFFICIAL_MONTAGE_DIVISORS[:levels]]
        raise ValueError(f"montage_counts={rule!r} is invalid: use one of {MONTAGE_RULES} or a list of {levels} ints")
    counts = list(rule)
    if len(counts) != levels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
        raise ValueError(
            f"montage_counts={counts!r} is invalid: with levels={levels} it must list {levels} positive integers "
            f"(one montage count per level), or be one of {MONTAGE_RULES}"
        )
    return counts


def downscale(images: torch.Tensor, factor: int, mode: str = "nearest") -> torch.Tensor:
    """Shrink ``(B, C, H, W)`` images by an integer ``factor`` to ``(B, C, H/factor, W/factor)``."""
    if mode not in DOWNSCALE_MODES:
        raise ValueError(f"downscale_mode={mode!r} is invalid: use one of {DOWNSCALE_MODES}")
    if factor == 1:
        return images
    size = (images.shape[-2] // factor, images.shape[-1] // factor)
    if mode == "nearest":
        return F.interpolate(images, size=size, mode="nearest")
    if mode == "area":
        return F.avg_pool2d(images, kernel_size=factor)
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def fill_cells(batch_size: int, slots: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Batch indices for ``slots`` cells: a random permutation of the slots taken modulo the batch size, as the
    released code draws them.

    Every image appears ``floor(slots / B)`` or ``ceil(slots / B)`` times and its repeats land in independent random
    cells, so no two montages of a level are copies of each other. The residues go through a random permutation of
    the batch, so that when ``slots`` is not a multiple of ``B`` the images with one cell more (or, with fewer slots
    than images, the images that appear at all) are random too; when it is a multiple, the distribution is exactly
    the released code's.
    """
    generator_device = generator.device if generator is not None else device
    residues = torch.randperm(slots, generator=generator, device=generator_device).remainder_(batch_size)
    images = torch.randperm(batch_size, generator=generator, device=generator_device)
    return images[residues].to(device)


def assemble_montage(
    images: torch.Tensor,
    level: int,
    num_montages: int,
    mode: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile downscaled ``images`` into montages.

    Args:
        images: ``(B, C, H, W)`` views of one augmentation side; ``H`` and ``W`` divisible by ``2**level``.
        level: ``0..MAX_LEVELS-1``; the grid is ``2**level x 2**level`` and each view is shrunk by ``2**level``.
        num_montages: ``M``, the number of montages to build.
        mode: downscaling, ``"nearest"`` (released code), ``"area"`` or ``"bilinear"`` (antialiased).
        generator: makes the cell filling deterministic; montages are built on ``images.device``.

    Returns:
        ``montages`` ``(M, C, H, W)`` and ``sources`` ``(M, 2**level, 2**level)``: the batch index of the image in
        each cell, row-major.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if not 0 <= level < MAX_LEVELS:
        raise ValueError(f"level={level} is invalid: montage levels are 0..{MAX_LEVELS - 1}")
    if num_montages < 1:
        raise ValueError(f"num_montages={num_montages} is invalid: it must be at least 1")
    batch, channels, height, width = images.shape
    grid = grid_side(level)
    if height % grid or width % grid:
        raise ValueError(f"image size {height}x{width} is not divisible by the level-{level} grid {grid}")
    sources = fill_cells(batch, num_montages * grid * grid, generator, images.device)
    cells = downscale(images, grid, mode)[sources]
    cell_h, cell_w = height // grid, width // grid
    montages = (
        cells.view(num_montages, grid, grid, channels, cell_h, cell_w)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(num_montages, channels, height, width)
    )
    return montages, sources.view(num_montages, grid, grid)


def assemble_levels(
    views: torch.Tensor,
    levels: int,
    rule: str | Sequence[int] = "paper",
    mode: str = "nearest",
    generator: torch.Generator | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Montages of every level ``0..levels-1``, as many per level as ``rule`` gives (see :func:`montage_counts`).

    Args:
        views: ``(B, levels, C, H, W)``, one view per level as in training, or ``(B, C, H, W)``, the same views at
            every level.
        generator: draws the cells of level 0, then level 1, ...; the same seed gives the same montages.

    Returns:
        Per level, ``(montages (M_i, C, H, W), sources (M_i, 2**i, 2**i))`` as :func:`assemble_montage` gives them.
    """
    if views.ndim not in (4, 5):
        raise ValueError(f"views must be (B, levels, C, H, W) or (B, C, H, W), got shape {tuple(views.shape)}")
    if views.ndim == 5 and views.shape[1] != levels:
        raise ValueError(
            f"views of shape {tuple(views.shape)} hold {views.shape[1]} views per image but levels={levels}"
        )
    counts = montage_counts(rule, len(views), levels)
    per_level = views.unbind(1) if views.ndim == 5 else [views] * levels
    return [assemble_montage(per_level[level], level, counts[level], mode, generator) for level in range(levels)]
