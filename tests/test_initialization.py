"""Weight initialisation: the released scheme's std per group of weights, and the frameworks' defaults."""

import math

import pytest
import torch

from mcl.methods import MCL


def build(weight_init):
    torch.manual_seed(0)
    return MCL(backbone={"name": "resnet50"}, neck={"name": "fpn"}, image_size=224, levels=4, weight_init=weight_init)


def std(tensor):
    return tensor.detach().float().std().item()


@pytest.fixture(scope="module")
def official():
    return build("official")


def test_official_init_stds(official):
    fpn = official.neck
    expected = {
        "stem conv (kaiming fan-in)": (official.backbone.model.conv1.weight, math.sqrt(2 / (3 * 7 * 7))),
        "C5 lateral (xavier-uniform)": (fpn.inner_blocks[-1][0].weight, math.sqrt(2 / (2048 + 256))),
        "P5 output conv (xavier-uniform)": (fpn.layer_blocks[-1][0].weight, math.sqrt(2 / (2 * 256 * 9))),
        "head conv (kaiming fan-out)": (official.head.convs[0][0].weight, math.sqrt(2 / (256 * 9))),
        "projector first Linear (kaiming fan-in)": (official.projector[0].weight, math.sqrt(2 / 256)),
        "predictor first Linear (normal 0.01)": (official.predictors[0][0].weight, 0.01),
        "predictor last Linear (normal 0.01)": (official.predictors[3][3].weight, 0.01),
    }
    for name, (weight, value) in expected.items():
        assert std(weight) == pytest.approx(value, rel=0.05), name
    assert official.projector[0].bias.abs().max() == 0 and official.predictors[1][0].bias.abs().max() == 0


def test_official_init_keeps_every_block_bn_at_one(official):
    blocks = [block for stage in range(1, 5) for block in getattr(official.backbone.model, f"layer{stage}")]
    assert all(torch.equal(block.bn3.weight, torch.ones_like(block.bn3.weight)) for block in blocks)


def test_target_network_starts_as_the_initialised_online_network(official):
    for online, target in official.momentum_pairs:
        assert all(torch.equal(a, b) for a, b in zip(online.parameters(), target.parameters(), strict=True))


def test_default_init_is_timm_and_torch_defaults():
    model = build("default")
    assert std(model.backbone.model.conv1.weight) == pytest.approx(math.sqrt(2 / (64 * 7 * 7)), rel=0.05)
    assert model.backbone.model.layer1[0].bn3.weight.abs().max() == 0  # timm's zero_init_last
    assert std(model.predictors[0][0].weight) == pytest.approx(1 / math.sqrt(3 * 256), rel=0.05)
    assert std(model.neck.inner_blocks[-1][0].weight) == pytest.approx(1 / math.sqrt(2048), rel=0.05)


def test_unknown_init_is_rejected():
    with pytest.raises(ValueError, match="weight_init='xavier'"):
        build("xavier")
