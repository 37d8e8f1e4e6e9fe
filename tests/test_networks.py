import pytest
import torch
import torch.nn.functional as F

from mcl.backbones import Backbone
from mcl.geometry import grid_side, neck_geometry
from mcl.heads import MLP, TileHead, split_tiles
from mcl.montage import assemble_montage
from mcl.pyramid import InterpolationNeck, PartialFPN, build_neck


@pytest.fixture(scope="module")
def resnet18():
    return Backbone("resnet18").eval()


@pytest.mark.parametrize("name", ["resnet18", "swin_test"])
def test_backbones_return_nchw_c2_to_c5(name):
    backbone = Backbone(name, image_size=64).eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 64, 64))
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2]
    assert [f.shape[1] for f in features] == backbone.channels
    assert backbone.forward_pooled(torch.randn(2, 3, 64, 64)).shape == (2, backbone.channels[-1])


def test_resnet50_channels():
    assert Backbone("resnet50").channels == [256, 512, 1024, 2048]


def test_partial_fpn_matches_torchvision_full_pyramid(resnet18):
    """Images ordered by level (2 of level 0, 1 of level 1, 3 of level 2, 2 of level 3): each level's map is
    torchvision's full-pyramid map of its own images."""
    torch.manual_seed(0)
    neck = PartialFPN(resnet18.channels, 32).eval()
    counts = [2, 1, 3, 2]
    with torch.no_grad():
        features = resnet18(torch.randn(sum(counts), 3, 64, 64))
        full = list(neck(dict(enumerate(features))).values())  # P2..P5
        maps = neck.forward_levels(features, counts)
        start = 0
        for level, count in enumerate(counts):
            assert torch.allclose(maps[level], full[3 - level][start : start + count], atol=1e-6)
            start += count


def test_partial_fpn_batchnorm_sees_the_images_that_need_each_map(resnet18):
    """Train mode: the C5 lateral normalises over every image, the P5 output conv over the level-0 images only."""
    torch.manual_seed(0)
    neck = PartialFPN(resnet18.channels, 8, levels=2)
    with torch.no_grad():
        features = resnet18(torch.randn(5, 3, 64, 64))
        level0, _ = neck.forward_levels(features, [2, 3])
        inner = neck.get_result_from_inner_blocks(features[3], 1)  # over all 5 images
        assert torch.allclose(level0, neck.get_result_from_layer_blocks(inner[:2], 1), atol=1e-6)
        alone = neck.get_result_from_inner_blocks(features[3][:2], 1)
        assert not torch.allclose(level0, neck.get_result_from_layer_blocks(alone, 1), atol=1e-3)


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_fpn_builds_only_the_maps_its_levels_read(resnet18, levels):
    neck = build_neck("fpn", resnet18.channels, 16, levels=levels)
    assert len(neck.inner_blocks) == len(neck.layer_blocks) == levels
    features = resnet18(torch.randn(2 * levels, 3, 64, 64))
    sum(level_map.sum() for level_map in neck.forward_levels(features, [2] * levels)).backward()
    assert all(p.grad is not None for p in neck.parameters())


@pytest.mark.parametrize(
    "neck_config", [{"name": "fpn"}, {"name": "interp"}, {"name": "interp", "stage": 4}], ids=["fpn", "interp", "c4"]
)
@pytest.mark.parametrize("image_size", [64, 96, 224])
def test_every_level_map_splits_into_one_t_by_t_tile_per_cell(resnet18, neck_config, image_size):
    """Every level the neck serves gets a map of its geometry's stride, one ``t x t`` tile per cell (``t`` = H/32 on
    C5, H/16 on C4)."""
    options = dict(neck_config)
    name = options.pop("name")
    levels = neck_geometry(name, **options).max_levels
    neck = build_neck(name, resnet18.channels, 16, levels=levels, **options).eval()
    with torch.no_grad():
        features = resnet18(torch.randn(levels, 3, image_size, image_size))
        for level, pyramid_map in enumerate(neck.forward_levels(features, [1] * levels)):
            grid, tile = grid_side(level), neck.geometry.tile(level, image_size)
            assert tile == image_size // 2 ** options.get("stage", 5)
            assert pyramid_map.shape[-2:] == (image_size // neck.geometry.stride(level),) * 2 == (grid * tile,) * 2
            assert split_tiles(pyramid_map, grid).shape == (grid * grid, 16, tile, tile)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_tiles_cover_exactly_their_cells(level):
    """Pool a montage down to the level's pyramid stride: tile k must be the pooled image of cell k."""
    images = torch.rand(8, 3, 64, 64)
    montages, sources = assemble_montage(images, level, 2, mode="area", generator=torch.Generator().manual_seed(1))
    stride = 2 ** (5 - level)
    tiles = split_tiles(F.avg_pool2d(montages, stride), 2**level)
    expected = F.avg_pool2d(images, 32)[sources.flatten()]  # each cell is 64 / 2**level px, pooled to t=2
    assert torch.allclose(tiles, expected, atol=1e-5)


def test_tile_head_does_not_leak_between_cells():
    torch.manual_seed(0)
    head = TileHead(8).eval()
    feature_map = torch.randn(1, 8, 8, 8)
    changed = feature_map.clone()
    changed[:, :, :4, :4] += 5.0  # cell (0, 0) of a 2x2 grid
    with torch.no_grad():
        before, after = head(split_tiles(feature_map, 2)), head(split_tiles(changed, 2))
    assert not torch.allclose(before[0], after[0])
    assert torch.equal(before[1:], after[1:])


def test_head_convs_have_box_head_shapes():
    head = TileHead(256, 4)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4
    assert all(c.weight.shape == (256, 256, 3, 3) and c.bias is None for c in convs)


def test_projector_ends_in_affine_free_batchnorm():
    projector = MLP(256, 2048, 256, final_norm=True)
    assert isinstance(projector[-1], torch.nn.BatchNorm1d) and not projector[-1].affine
    assert projector(torch.randn(4, 256)).shape == (4, 256)


def test_interp_neck_is_one_conv_on_c5(resnet18):
    neck = InterpolationNeck(resnet18.channels, 32)
    convs = [m for m in neck.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 and convs[0].in_channels == 512 and convs[0].kernel_size == (1, 1)


def test_unknown_neck_and_backbone_are_rejected():
    with pytest.raises(ValueError, match="neck.name='c4'"):
        build_neck("c4", [1, 2, 3, 4])
    with pytest.raises(ValueError, match="backbone.name='no_such_model' is not a timm model"):
        Backbone("no_such_model")


@pytest.mark.parametrize("image_size", [64, 96])
def test_interp_neck_on_c4_keeps_c4_stride_at_level_0_and_tiles_of_h_over_16(resnet18, image_size):
    """neck.stage=4: the 1x1 conv reads C4 (256 channels on ResNet-18); level i's map has stride 16/2**i."""
    neck = build_neck("interp", resnet18.channels, 16, levels=3, stage=4).eval()
    assert neck.reduce[0].in_channels == 256
    tile = image_size // 16
    with torch.no_grad():
        features = resnet18(torch.randn(3, 3, image_size, image_size))
        maps = neck.forward_levels(features, [1, 1, 1])
        for level, level_map in enumerate(maps):
            grid = 2**level
            assert level_map.shape[-2:] == features[2 - level].shape[-2:] == (grid * tile, grid * tile)
            assert split_tiles(level_map, grid).shape == (grid * grid, 16, tile, tile)
        assert torch.allclose(maps[0], neck.reduce(features[2][:1]), atol=1e-6)  # C4 at its own resolution


def test_interp_neck_stages_are_checked(resnet18):
    assert build_neck("interp", resnet18.channels, 16).stage == 5  # the default: today's C5 neck
    with pytest.raises(ValueError, match=r"neck.stage=3 is invalid: use 5 .* or 4"):
        build_neck("interp", resnet18.channels, 16, stage=3)
    with pytest.raises(ValueError, match=r"neck.stage=4 with levels=4 is invalid.*levels<=3 or neck.stage=5"):
        build_neck("interp", resnet18.channels, 16, levels=4, stage=4)
    with pytest.raises(ValueError, match=r"neck.name=fpn takes no \['stage'\]"):
        build_neck("fpn", resnet18.channels, 16, stage=4)


def test_interp_neck_refuses_a_1x1_source_map_for_several_levels(resnet18):
    """At 32 px C5 is 1x1, and a 1x1 map resized to level 1's 2x2 is four equal cells: every tile the same."""
    features = [torch.randn(2, c, 32 // s, 32 // s) for c, s in zip(resnet18.channels, (4, 8, 16, 32), strict=True)]
    maps = build_neck("interp", resnet18.channels, 16, levels=2).eval().forward_levels(features, [1, 1])
    assert maps[1].shape[-2:] == (2, 2) and torch.equal(maps[1], maps[1][..., :1, :1].expand_as(maps[1]))
    with pytest.raises(ValueError, match=r"neck.stage=5 with image_size=32 and levels=2 is invalid: C5 is 1x1"):
        build_neck("interp", resnet18.channels, 16, levels=2, image_size=32)
    # C4 is 2x2 at 32 px, C5 2x2 at 64 px, and one level reads the map as it is: all accepted.
    assert build_neck("interp", resnet18.channels, 16, levels=3, image_size=32, stage=4).stage == 4
    assert build_neck("interp", resnet18.channels, 16, levels=4, image_size=64).stage == 5
    assert build_neck("interp", resnet18.channels, 16, levels=1, image_size=32).stage == 5


def test_interp_neck_on_c4_embeds_every_cell_and_leaves_res5_outside_the_loss():
    """neck.stage=4 through the method's cell path: one embedding per cell, no gradient into layer4."""
    from mcl.cells import level_cells
    from mcl.methods import MCL

    from .conftest import small_trunk

    model = MCL(**small_trunk(3, neck={"name": "interp", "out_channels": 16, "stage": 4}))
    images = [torch.rand(4, 3, 64, 64), torch.rand(2, 3, 64, 64), torch.rand(1, 3, 64, 64)]
    cells = level_cells(images, model.backbone, model.neck, model.head)
    assert [c.shape for c in cells] == [(4, 16), (8, 16), (16, 16)]
    sum(c.sum() for c in cells).backward()
    resnet = model.backbone.model
    assert resnet.layer3[0].conv1.weight.grad is not None and resnet.layer4[0].conv1.weight.grad is None
