"""Pictures of the pretext task: montages of every level with the source image of each cell written on it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from matplotlib.figure import Figure


def to_display(images: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` in any range -> ``(N, H, W, C)`` in ``[0, 1]``, each image stretched to its own range."""
    flat = images.detach().float().flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    scaled = (images.float() - low.view(-1, 1, 1, 1)) / (high - low).clamp_min(1e-8).view(-1, 1, 1, 1)
    return scaled.permute(0, 2, 3, 1).cpu()


def montage_figure(
    per_level: Sequence[tuple[torch.Tensor, torch.Tensor]], montages_per_level: int = 2, label_cells: bool = True
) -> Figure:
    """One row per level: its first montages, each cell labelled with the batch index of its source image."""
    columns = max(1, min(montages_per_level, max(len(m) for m, _ in per_level)))
    figure = Figure(figsize=(2.4 * columns, 2.4 * len(per_level)), layout="tight")
    axes = figure.subplots(len(per_level), columns, squeeze=False)
    for level, (montages, sources) in enumerate(per_level):
        grid = sources.shape[-1]
        pictures = to_display(montages)
        for column in range(columns):
            axis = axes[level][column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column >= len(montages):
                axis.set_visible(False)
                continue
            axis.imshow(pictures[column].squeeze(-1) if pictures.shape[-1] == 1 else pictures[column], cmap="gray")
            axis.set_title(f"level {level}, montage {column} ({grid}x{grid})", fontsize=8)
            if not label_cells:
                continue
            cell = montages.shape[-1] / grid
            for row in range(grid):
                for col in range(grid):
                    axis.text(
                        (col + 0.08) * cell,
                        (row + 0.3) * cell,
                        str(int(sources[column, row, col])),
                        color="yellow",
                        fontsize=max(5, 11 - 2 * level),
                        bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.5, "linewidth": 0},
                    )
    return figure


def cell_counts(per_level: Sequence[tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> torch.Tensor:
    """``(levels, B)``: how many cells of each level hold each image."""
    return torch.stack([torch.bincount(sources.flatten(), minlength=batch_size) for _, sources in per_level])
