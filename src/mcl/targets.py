"""Target assignment, the one place that says what each online level is compared with: which target levels
(:meth:`TargetAssignment.compared`, read by the contrastive losses) and what the target network embeds to make them
(:meth:`TargetAssignment.targets`, called by the method's target pass). The ``loss.target_assignment`` key names one
of :data:`TARGET_ASSIGNMENTS`. No Lightning."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F

from mcl.sides import SIDES, BySideLevel, SideMontages, montage_images

# The target network on ``images[side][level]`` ``(M, C, H, W)``, keeping the first ``embedded_levels`` levels (all
# for ``None``): projector embeddings keyed by ``(side, level)``.
TargetEmbed = Callable[[list[list[torch.Tensor]], int | None], BySideLevel]


def per_image_targets(cells: torch.Tensor, sources: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One target per image from the target network's montage cells: the normalised mean of its cells.

    Args:
        cells: ``(N, D)`` target embeddings of a level's cells, in ``sources`` order.
        sources: ``(N,)`` batch index of each cell's image.

    Returns:
        ``(batch, D)`` unit targets (zero rows for images in no cell) and the ``(batch,)`` mask of images present.
    """
    unit = F.normalize(cells.float(), dim=1)
    sums = unit.new_zeros(batch, unit.shape[1]).index_add_(0, sources, unit)
    present = torch.zeros(batch, dtype=torch.bool, device=sources.device).index_fill_(0, sources, True)
    return F.normalize(sums, dim=1), present


class TargetAssignment:
    """What online level ``i`` of a model with ``levels`` levels is compared with.

    ``reads_montages``: whether the target network embeds the montages (one target per image and level) or each
    side's plain views (level 0 only).
    """

    name: ClassVar[str]
    reads_montages: ClassVar[bool]

    def __init__(self, levels: int):
        self.levels = levels

    @property
    def target_levels(self) -> int:
        """How many target levels there are: ``j = 0 .. target_levels - 1``."""
        return self.levels if self.reads_montages else 1

    def compared(self, level: int) -> list[int]:
        """The target levels that online level ``level`` is compared with (losses averaged over them)."""
        raise NotImplementedError

    def targets(
        self, embed: TargetEmbed, views: torch.Tensor, montages: list[SideMontages], montages_in_batch: bool
    ) -> tuple[BySideLevel, BySideLevel | None]:
        """The targets of both sides, ``{(side, j): (B, D)}`` for ``j < target_levels``, and beyond ``top`` the
        ``(B,)`` masks of the images that have one at level ``j`` (``None`` for ``top``).

        Args:
            embed: the target network (see :data:`TargetEmbed`).
            views: ``(B, 2, levels, C, H, W)``, the batch the montages were built from.
            montages: ``montages[side]``, per level ``(montages, sources)``.
            montages_in_batch: for plain-view targets, whether the montages join the plain views' pass (sharing its
                BatchNorm statistics, as in the released code) though only the plain views are kept.
        """
        raise NotImplementedError


class TopTarget(TargetAssignment):
    """``top`` (the released code): every level is compared with each image's level-0 embedding, its plain view."""

    name = "top"
    reads_montages = False

    def compared(self, level: int) -> list[int]:
        return [0]

    def targets(
        self, embed: TargetEmbed, views: torch.Tensor, montages: list[SideMontages], montages_in_batch: bool
    ) -> tuple[BySideLevel, None]:
        plain = [views[:, side, 0] for side in SIDES]
        if montages_in_batch:
            images = [[plain[side]] + [m for m, _ in montages[side][1:]] for side in SIDES]
        else:
            images = [[plain[side]] for side in SIDES]
        return embed(images, 1), None


class MontageTargets(TargetAssignment):
    """The target network embeds the same montages as the online network (with their own cell layout) and each image
    gets the normalised mean of its cells at each level (:func:`per_image_targets`), so the target cost grows like
    the online cost. An image in no cell of a level has no target there."""

    reads_montages = True

    def targets(
        self, embed: TargetEmbed, views: torch.Tensor, montages: list[SideMontages], montages_in_batch: bool
    ) -> tuple[BySideLevel, BySideLevel]:
        batch = len(views)
        targets: BySideLevel = {}
        present: BySideLevel = {}
        for (side, level), cells in embed(montage_images(montages), None).items():
            sources = montages[side][level][1].flatten()
            targets[side, level], present[side, level] = per_image_targets(cells, sources, batch)
        return targets, present


class SameLevelTargets(MontageTargets):
    """``same-level``: the target network's embedding of the same image at the same level."""

    name = "same-level"

    def compared(self, level: int) -> list[int]:
        return [level]


class AllLevelsTargets(MontageTargets):
    """``all-levels``: every target level, losses averaged."""

    name = "all-levels"

    def compared(self, level: int) -> list[int]:
        return list(range(self.levels))


TARGET_ASSIGNMENTS: dict[str, type[TargetAssignment]] = {
    cls.name: cls for cls in (TopTarget, SameLevelTargets, AllLevelsTargets)
}


def build_target_assignment(name: str, levels: int) -> TargetAssignment:
    """The assignment the ``loss.target_assignment`` key names, for a model with ``levels`` levels."""
    if name not in TARGET_ASSIGNMENTS:
        raise ValueError(f"target_assignment={name!r} is invalid: use one of {tuple(TARGET_ASSIGNMENTS)}")
    return TARGET_ASSIGNMENTS[name](levels)
