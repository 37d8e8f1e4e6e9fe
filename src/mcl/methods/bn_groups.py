"""Which samples share BatchNorm statistics in MCL's passes (``method.bn_groups``), one strategy per choice, chosen
once when the method is built: how a network embeds both sides' images and how the predictors run over them."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from mcl.cells import all_map_cells, level_cells, own_cells
from mcl.geometry import cell_count
from mcl.sides import SIDES, BySideLevel, split_sides

if TYPE_CHECKING:
    from mcl.methods.mcl import Network


class PerSide:
    """``per_side`` (the released code): each augmentation side on its own. Backbone and neck see that side's images
    of all levels together; head and projector run per (side, level), predictors per (side, level). The target
    network runs the same way, so under ``top`` its backbone statistics include the montages though it keeps the
    plain views' embeddings (``montages_in_target_batch``)."""

    name: ClassVar[str] = "per_side"
    montages_in_target_batch: ClassVar[bool] = True

    def embed(
        self,
        network: Network,
        images: list[list[torch.Tensor]],
        embedded_levels: int | None = None,
        pooled: list[torch.Tensor] | None = None,
    ) -> BySideLevel:
        """Projector embeddings of every cell, keyed by ``(side, level)``.

        Args:
            images: ``images[side][level]`` ``(M, C, H, W)``: montages, or plain views at level 0.
            embedded_levels: see :func:`~mcl.cells.level_cells`.
            pooled: receives the detached pooled C5 of the level-0 images, side 0's then side 1's (every grouping
                appends them in this order), for the online probe (:mod:`mcl.online_probe`).
        """
        return {
            (side, level): network.projector(cells)
            for side, side_images in zip(SIDES, images, strict=True)
            for level, cells in enumerate(level_cells(side_images, *network.trunk, embedded_levels, pooled=pooled))
        }

    def predict(self, predictors: nn.ModuleList, embeddings: BySideLevel) -> BySideLevel:
        """Each level's predictor on that level's embeddings, keyed as they are."""
        return {(side, level): predictors[level](z) for (side, level), z in embeddings.items()}


class PerSidePlainTarget(PerSide):
    """``per_side_plain_target``: the online pass as ``per_side``; the target embeds each side's plain views only."""

    name = "per_side_plain_target"
    montages_in_target_batch = False


class PerSideAllMaps(PerSide):
    """``per_side`` with ``all_pyramid_maps``: what the released code computes rather than only what the loss reads.

    Per side: one backbone pass over the side's images of all levels (``N`` images), every map of all ``N`` and the
    tile head once per map over all their tiles (:func:`~mcl.cells.all_map_cells`), then the projector once per map
    over those ``N * 4**i`` features, finest map first. Level ``i`` keeps the rows of its own images in map ``i``
    (:func:`~mcl.cells.own_cells`): the cells ``per_side`` gives, in the same order. Levels from ``embedded_levels``
    on are computed and left out (the released target network keeps the plain views' P5 embeddings only).
    """

    def embed(
        self,
        network: Network,
        images: list[list[torch.Tensor]],
        embedded_levels: int | None = None,
        pooled: list[torch.Tensor] | None = None,
    ) -> BySideLevel:
        out: BySideLevel = {}
        for side, side_images in zip(SIDES, images, strict=True):
            cells = all_map_cells(side_images, *network.trunk, pooled=pooled)
            embeddings = {level: network.projector(cells[level]) for level in reversed(range(len(cells)))}
            counts = [len(level_images) for level_images in side_images[:embedded_levels]]
            per_map = [embeddings[level] for level in range(len(cells))]
            out.update({(side, level): z for level, z in enumerate(own_cells(per_map, counts))})
        return out


class Joint:
    """``joint``: one backbone pass over both sides and all levels (levels in order, sides within a level), one head
    and one projector call over all cells, each predictor over both sides; the target embeds both sides' plain views
    together. Fewest kernel launches."""

    name: ClassVar[str] = "joint"
    montages_in_target_batch: ClassVar[bool] = False

    def embed(
        self,
        network: Network,
        images: list[list[torch.Tensor]],
        embedded_levels: int | None = None,
        pooled: list[torch.Tensor] | None = None,
    ) -> BySideLevel:
        by_level = [torch.cat(level_images) for level_images in zip(*images, strict=True)]
        cells = level_cells(by_level, *network.trunk, embedded_levels, head_per_level=False, pooled=pooled)
        embeddings = network.projector(torch.cat(cells)).split([len(c) for c in cells])
        out: BySideLevel = {}
        for level, level_embeddings in enumerate(embeddings):
            cells_per_side = [images[side][level].shape[0] * cell_count(level) for side in SIDES]
            out.update(split_sides(level_embeddings, cells_per_side, level))
        return out

    def predict(self, predictors: nn.ModuleList, embeddings: BySideLevel) -> BySideLevel:
        predictions: BySideLevel = {}
        for level, predictor in enumerate(predictors):
            both = [embeddings[side, level] for side in SIDES]
            predictions.update(split_sides(predictor(torch.cat(both)), [len(z) for z in both], level))
        return predictions


BatchNormGrouping = PerSide | Joint
GROUPINGS: dict[str, type[BatchNormGrouping]] = {cls.name: cls for cls in (PerSide, PerSidePlainTarget, Joint)}
# Which samples share BatchNorm statistics in a training step (``method.bn_groups``).
BN_GROUPS = tuple(GROUPINGS)


def build_grouping(bn_groups: str, all_pyramid_maps: bool = False) -> BatchNormGrouping:
    """The grouping ``bn_groups`` names (:data:`BN_GROUPS`); with ``all_pyramid_maps``, which needs ``per_side``,
    :class:`PerSideAllMaps`."""
    if bn_groups not in GROUPINGS:
        raise ValueError(f"bn_groups={bn_groups!r} is invalid: use one of {BN_GROUPS}")
    if all_pyramid_maps and bn_groups != "per_side":
        raise ValueError(
            f"all_pyramid_maps=true needs bn_groups=per_side, not {bn_groups!r}: it reproduces the released code's "
            "passes, one per augmentation side over that side's plain views and montages in both networks; for "
            "another grouping set method.all_pyramid_maps=false (preset=official sets it true)"
        )
    return PerSideAllMaps() if all_pyramid_maps else GROUPINGS[bn_groups]()
