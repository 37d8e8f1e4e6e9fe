"""``mcl.geometry``: the stage, map, stride and tile side of every montage level, for each neck."""

import pytest

from mcl.geometry import (
    MAX_LEVELS,
    STAGES,
    STRIDES,
    LevelGeometry,
    cell_count,
    check_image_size,
    grid_side,
    neck_geometry,
    stage_index,
    stage_stride,
)
from mcl.pyramid import build_neck

FPN = neck_geometry("fpn")
INTERP_C5 = neck_geometry("interp", 5)
INTERP_C4 = neck_geometry("interp", 4)
# ResNet-18's C2..C5 widths: enough to build a neck without a backbone.
RESNET18_CHANNELS = [64, 128, 256, 512]


def test_the_backbone_stages_and_their_strides():
    assert STAGES == (2, 3, 4, 5) and STRIDES == (4, 8, 16, 32) and MAX_LEVELS == 4
    assert [stage_stride(stage) for stage in STAGES] == [4, 8, 16, 32]
    assert [stage_index(stage) for stage in STAGES] == [0, 1, 2, 3]


def test_grid_side_and_cell_count_per_level():
    assert [grid_side(level) for level in range(4)] == [1, 2, 4, 8]
    assert [cell_count(level) for level in range(4)] == [1, 4, 16, 64]


@pytest.mark.parametrize(
    ("geometry", "maps", "stages", "strides", "feature_indices"),
    [
        (FPN, ["P5", "P4", "P3", "P2"], [5, 4, 3, 2], [32, 16, 8, 4], [3, 2, 1, 0]),
        (INTERP_C5, ["C5", "C5->C4", "C5->C3", "C5->C2"], [5, 4, 3, 2], [32, 16, 8, 4], [3, 2, 1, 0]),
        (INTERP_C4, ["C4", "C4->C3", "C4->C2"], [4, 3, 2], [16, 8, 4], [2, 1, 0]),
    ],
    ids=["fpn", "interp_c5", "interp_c4"],
)
def test_each_level_reads_one_map_at_one_stride(geometry, maps, stages, strides, feature_indices):
    levels = range(geometry.max_levels)
    assert geometry.max_levels == len(maps)
    assert [geometry.map_name(level) for level in levels] == maps
    assert [geometry.stage(level) for level in levels] == stages
    assert [geometry.stride(level) for level in levels] == strides
    assert [geometry.feature_index(level) for level in levels] == feature_indices


@pytest.mark.parametrize(("image_size", "tile_on_c5", "tile_on_c4"), [(32, 1, 2), (64, 2, 4), (224, 7, 14)])
def test_every_level_has_the_same_tile_side_h_over_32_on_c5_and_h_over_16_on_c4(image_size, tile_on_c5, tile_on_c4):
    assert [FPN.tile(level, image_size) for level in range(4)] == [tile_on_c5] * 4
    assert [INTERP_C5.tile(level, image_size) for level in range(4)] == [tile_on_c5] * 4
    assert [INTERP_C4.tile(level, image_size) for level in range(3)] == [tile_on_c4] * 3


def test_the_stages_levels_read_finest_first():
    assert [FPN.stages(levels) for levels in (1, 2, 3, 4)] == [(5,), (4, 5), (3, 4, 5), (2, 3, 4, 5)]
    assert INTERP_C4.stages(3) == (2, 3, 4)


def test_levels_a_neck_cannot_serve_are_refused():
    c4_levels = r"level=3 is invalid for the interp neck reading C4 at level 0: levels 0\.\.2 read C4, C4->C3, C4->C2"
    with pytest.raises(ValueError, match=c4_levels):
        INTERP_C4.stride(3)
    with pytest.raises(ValueError, match=r"level=4 is invalid for the fpn neck .* read P5, P4, P3, P2"):
        FPN.stage(4)
    with pytest.raises(ValueError, match="level=-1 is invalid"):
        FPN.stage(-1)
    with pytest.raises(ValueError, match="stage=4 is invalid for the fpn neck: its level 0 reads P5"):
        neck_geometry("fpn", 4)
    with pytest.raises(ValueError, match=r"top_stage=6 is invalid: level 0 reads one of the stages \(2, 3, 4, 5\)"):
        LevelGeometry("interp", 6)


def test_tiles_must_be_whole():
    with pytest.raises(ValueError, match="image_size=48 gives level-0 cells of 48 px, not a whole positive number of "):
        FPN.tile(0, 48)
    with pytest.raises(ValueError, match="image_size=36 gives level-3 cells of 4.5 px"):
        FPN.tile(3, 36)
    with pytest.raises(ValueError, match="image_size=16 gives level-0 cells of 16 px"):
        INTERP_C5.tile(0, 16)


@pytest.mark.parametrize("image_size", [0, 16, 48, 64.0, True])
def test_image_sizes_that_are_not_multiples_of_32_are_refused(image_size):
    with pytest.raises(ValueError, match=r"image_size=.* is invalid: it must be a positive multiple of 32"):
        check_image_size(image_size)


def test_image_sizes_that_are_multiples_of_32_pass():
    assert [check_image_size(size) for size in (32, 64, 224)] == [32, 64, 224]


def test_the_necks_carry_their_geometry():
    assert build_neck("fpn", RESNET18_CHANNELS, 8, levels=3).geometry == FPN
    assert build_neck("interp", RESNET18_CHANNELS, 8).geometry == INTERP_C5
    assert build_neck("interp", RESNET18_CHANNELS, 8, levels=3, stage=4).geometry == INTERP_C4
    finest = r"neck.stage=4 with levels=4 is invalid: .* level 2 already reads the finest, C4->C2 at stride 4"
    with pytest.raises(ValueError, match=finest):
        build_neck("interp", RESNET18_CHANNELS, 8, levels=4, stage=4)
