import pytest
import torch

from mcl.methods.bn_groups import BN_GROUPS, Joint, PerSide, PerSideAllMaps, PerSidePlainTarget, build_grouping
from mcl.sides import montage_images

from .conftest import small_mcl


def test_each_name_builds_its_strategy_once():
    assert BN_GROUPS == ("per_side", "per_side_plain_target", "joint")
    assert [type(build_grouping(name)) for name in BN_GROUPS] == [PerSide, PerSidePlainTarget, Joint]
    assert type(build_grouping("per_side", all_pyramid_maps=True)) is PerSideAllMaps
    assert [build_grouping(name).montages_in_target_batch for name in BN_GROUPS] == [True, False, False]
    assert type(small_mcl(bn_groups="joint").grouping) is Joint


def test_bad_choices_are_named():
    with pytest.raises(ValueError, match=r"bn_groups='sides' is invalid: use one of \('per_side'"):
        build_grouping("sides")
    with pytest.raises(ValueError, match="all_pyramid_maps=true needs bn_groups=per_side, not 'joint'"):
        build_grouping("joint", all_pyramid_maps=True)


@pytest.mark.parametrize("grouping", [Joint(), PerSideAllMaps()], ids=["joint", "all_maps"])
def test_in_eval_mode_every_grouping_embeds_and_predicts_the_same_cells(grouping):
    """BatchNorm with running statistics makes each cell independent of its batch: the groupings differ only in which
    samples share a call, so they give the same predictions, keyed and ordered alike."""
    model = small_mcl(levels=2).eval()
    views = torch.randn(4, 2, 2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = montage_images([model.build_montages(views[:, side]) for side in (0, 1)])
    with torch.no_grad():
        expected = PerSide().predict(model.predictors, PerSide().embed(model.online, images))
        got = grouping.predict(model.predictors, grouping.embed(model.online, images))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5)
