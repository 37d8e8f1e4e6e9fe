"""Level geometry: which map each montage level reads, at what stride, and how its cells tile it, for each neck.

The backbone returns the stages C2..C5 (:data:`STAGES`; ``Ck`` has stride ``2**k``). Montage level ``i`` shrinks
views by ``2**i`` and tiles them into a ``2**i x 2**i`` grid (:func:`grid_side`), a montage of the view's side
``H``. A neck gives level ``i`` a map of stride ``2**(top - i)``, where ``top`` is the stage level 0 reads:

- ``fpn``: ``top = 5``; level ``i`` reads ``P(5-i)``: P5, P4, P3, P2.
- ``interp``: ``top = neck.stage``; level ``i`` reads C``top`` resized to the size of ``C(top - i)``.

A level-``i`` cell is ``H / 2**i`` pixels wide, so it covers a ``t x t`` tile of its map with
``t = (H / 2**i) / 2**(top - i) = H / 2**top`` at every level: ``H/32`` for ``fpn`` and ``interp`` on C5, ``H/16``
for ``interp`` on C4. The finest map has C2's stride, so a neck serves ``top - 1`` levels at most: 4
(:data:`MAX_LEVELS`) on C5, 3 on C4.

Every module that needs one of these facts asks here: the necks, montage assembly, the backbone, the methods and the
exports (which place each pretraining stage in a detector's pyramid; those pyramids are torchvision's fixed layouts,
in :mod:`mcl.detection.models`).
"""

from __future__ import annotations

from dataclasses import dataclass

# The backbone's stages C2..C5, finest first; the FPN's maps P2..P5 have the same strides.
STAGES = (2, 3, 4, 5)
# The stage montage level 0 reads by default: C5 / P5.
TOP_STAGE = STAGES[-1]


def stage_stride(stage: int) -> int:
    """The stride of ``C{stage}`` (and of ``P{stage}``): ``2**stage``."""
    return 2**stage


def stage_index(stage: int) -> int:
    """The index of ``C{stage}`` in the backbone's ``[C2, C3, C4, C5]``."""
    return STAGES.index(stage)


# Strides of C2..C5: 4, 8, 16, 32.
STRIDES = tuple(stage_stride(stage) for stage in STAGES)
# Levels a neck can serve when level 0 reads C5: one per stage, level 3 reading C2's stride.
MAX_LEVELS = len(STAGES)


def grid_side(level: int) -> int:
    """Cells per side of a level-``level`` montage, and the factor its views are shrunk by: ``2**level``."""
    return 2**level


def cell_count(level: int) -> int:
    """Cells of a level-``level`` montage: ``4**level``."""
    return grid_side(level) ** 2


def check_image_size(image_size: int) -> int:
    """Return ``image_size`` if it is a positive multiple of C5's stride (32), so that the backbone's every stage and
    every level's cells have whole sizes at any neck; else raise a ValueError naming the key."""
    stride = STRIDES[-1]
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < stride or image_size % stride:
        raise ValueError(
            f"image_size={image_size!r} is invalid: it must be a positive multiple of {stride}, so that every montage "
            f"cell covers a whole tile of its pyramid map (e.g. 64, 96, 224)"
        )
    return image_size


@dataclass(frozen=True)
class LevelGeometry:
    """Where the montage levels of one neck read: level ``i`` reads a map with the stride of stage
    ``top_stage - i``.

    Args:
        neck: the neck's name, ``fpn`` or ``interp`` (it names the maps).
        top_stage: the stage level 0 reads (5 for ``fpn``; ``neck.stage`` for ``interp``).
    """

    neck: str = "fpn"
    top_stage: int = TOP_STAGE

    def __post_init__(self):
        if self.top_stage not in STAGES:
            raise ValueError(f"top_stage={self.top_stage!r} is invalid: level 0 reads one of the stages {STAGES}")

    @property
    def max_levels(self) -> int:
        """The most levels this neck serves: level ``max_levels - 1`` reads C2's stride, the finest."""
        return self.top_stage - STAGES[0] + 1

    def stage(self, level: int) -> int:
        """The stage whose stride (and, but for ``interp``'s resize, whose map) level ``level`` reads."""
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < self.max_levels:
            raise ValueError(
                f"level={level!r} is invalid for the {self.neck} neck reading C{self.top_stage} at level 0: levels "
                f"0..{self.max_levels - 1} read {', '.join(self.map_name(level) for level in range(self.max_levels))}"
            )
        return self.top_stage - level

    def stride(self, level: int) -> int:
        """The stride of level ``level``'s map, in pixels of the montage: ``2**(top_stage - level)``."""
        return stage_stride(self.stage(level))

    def map_name(self, level: int) -> str:
        """The map level ``level`` reads: ``P4`` (``fpn``), ``C5->C4`` (``interp``: C5 resized to C4's size), ``C5``
        (``interp`` at level 0, unresized)."""
        stage = self.stage(level)
        if self.neck == "fpn":
            return f"P{stage}"
        return f"C{self.top_stage}" if stage == self.top_stage else f"C{self.top_stage}->C{stage}"

    def feature_index(self, level: int) -> int:
        """Index into the backbone's ``[C2, C3, C4, C5]`` of the stage level ``level`` reads."""
        return stage_index(self.stage(level))

    def stages(self, levels: int) -> tuple[int, ...]:
        """The stages levels ``0..levels-1`` read, finest first (the order of torchvision's FPN blocks)."""
        return tuple(sorted(self.stage(level) for level in range(levels)))

    def tile(self, level: int, image_size: int) -> int:
        """The side ``t`` of the tile a level-``level`` cell covers in its map, for montages of side
        ``image_size``: the cell's pixels over the map's stride, ``image_size / 2**top_stage`` at every level."""
        cell = image_size // grid_side(level)
        tile, rest = divmod(cell, self.stride(level))
        if rest or image_size % grid_side(level) or not tile:
            raise ValueError(
                f"image_size={image_size} gives level-{level} cells of {image_size / grid_side(level):g} px, not a "
                f"whole positive number of {self.map_name(level)}'s stride {self.stride(level)}"
            )
        return tile


def neck_geometry(name: str, stage: int = TOP_STAGE) -> LevelGeometry:
    """The level geometry of the neck ``name``: ``stage`` is the ``interp`` neck's C stage; the FPN's level 0 reads
    P5."""
    if name == "fpn" and stage != TOP_STAGE:
        raise ValueError(f"stage={stage!r} is invalid for the fpn neck: its level 0 reads P{TOP_STAGE}")
    return LevelGeometry(name, stage)
