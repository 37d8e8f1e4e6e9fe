"""The shared tile head, projector and predictors.

Every montage cell covers exactly a ``t x t`` tile of its level's map, the same ``t`` at every level, so cells are cut
out by a reshape. ``t`` depends on the neck (:meth:`mcl.geometry.LevelGeometry.tile`): ``H / 32`` for ``fpn`` and
``interp`` on C5, ``H / 16`` for ``interp`` on C4. The head's convs run on each tile separately, with zero padding
at tile borders: no cell sees its neighbours.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation


def split_tiles(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """``(M, C, grid*t, grid*t)`` -> ``(M*grid*grid, C, t, t)``, cells in row-major order within each montage.

    ``grid`` is the level's :func:`~mcl.geometry.grid_side`. The cell order matches ``sources.view(M, grid*grid)``
    from :func:`mcl.montage.assemble_montage`.
    """
    montages, channels, height, width = feature_map.shape
    if height % grid or width % grid:
        raise ValueError(f"a {height}x{width} map cannot be split into a {grid}x{grid} grid of equal tiles")
    tile_h, tile_w = height // grid, width // grid
    return (
        feature_map.view(montages, channels, grid, tile_h, grid, tile_w)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(montages * grid * grid, channels, tile_h, tile_w)
    )


class TileHead(nn.Module):
    """``num_convs`` x [3x3 conv (no bias), BN, ReLU] on each tile, then global average pooling.

    The convs have the shapes of torchvision's ``FastRCNNConvFCHead`` convs (detectron2's ``box_head.conv1..4``),
    so they transfer to a detector's box head. ``(N, C, t, t)`` tiles -> ``(N, C)``.
    """

    def __init__(self, channels: int = 256, num_convs: int = 4):
        super().__init__()
        self.convs = nn.Sequential(
            *[
                Conv2dNormActivation(channels, channels, kernel_size=3, norm_layer=nn.BatchNorm2d, bias=False)
                for _ in range(num_convs)
            ]
        )

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.convs(tiles).mean(dim=(2, 3))


class MLP(nn.Sequential):
    """``in -> hidden (BN, ReLU) -> out``, optionally followed by a BN without affine (the projector's last layer)."""

    def __init__(self, in_dim: int = 256, hidden_dim: int = 2048, out_dim: int = 256, final_norm: bool = False):
        layers: list[nn.Module] = [
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        ]
        if final_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)
