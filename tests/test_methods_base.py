"""What ``MultiLevelModule`` owns, checked through both of its methods: the base settings refused by name, the
loss taken and recorded, montages of every level drawn from the model's stream, the kNN features, the parts that
join the Trainer, and what compiles."""

import pytest
import torch

from mcl.divergence import DivergenceGuard
from mcl.knn_monitor import KNNMonitor
from mcl.loss import MultiLevelCrossEntropy, MultiLevelInfoNCE
from mcl.resume import ConfiguredOptimizerOnResume

from .conftest import small_mcl, small_supervised

METHODS = {"mcl": small_mcl, "supervised": small_supervised}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"levels": 5}, "levels=5"),
        ({"image_size": 48}, "image_size=48"),
        ({"downscale_mode": "lanczos"}, "downscale_mode='lanczos' is invalid"),
        ({"montage_counts": [4, 1]}, r"montage_counts=\[4, 1\] is invalid: with levels=3"),
        ({"weight_init": "xavier"}, "weight_init='xavier'"),
    ],
)
def test_base_settings_are_refused_by_name_in_every_method(method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        METHODS[method](**{"levels": 3, **kwargs})


@pytest.mark.parametrize(("method", "default"), [("mcl", MultiLevelInfoNCE), ("supervised", MultiLevelCrossEntropy)])
def test_without_a_loss_the_method_takes_its_default_for_its_levels_and_records_it(method, default):
    model = METHODS[method](levels=3, **({"loss": None} if method == "mcl" else {}))
    assert type(model.loss) is default and model.loss.levels == 3
    assert model.hparams["loss"] == default(3).config()
    assert model.hparams["loss"]["_target_"] == f"mcl.loss.{default.__name__}"


def test_a_loss_for_other_levels_or_of_another_kind_is_refused():
    with pytest.raises(ValueError, match="loss.levels=2 but levels=3"):
        small_supervised(levels=3, loss=MultiLevelCrossEntropy(2))
    with pytest.raises(ValueError, match=r"SupervisedMultiLevel needs a MultiLevelCrossEntropy loss \(loss=cross_en"):
        small_supervised(levels=2, loss=MultiLevelInfoNCE(2))


def test_montages_of_every_level_take_each_image_once_and_replay_from_a_seed():
    model = small_supervised(levels=3)
    views = torch.randn(16, 3, 3, 64, 64)
    model.seed_montages(5)
    drawn = model.build_montages(views)
    assert [tuple(montages.shape) for montages, _ in drawn] == [(16, 3, 64, 64), (4, 3, 64, 64), (1, 3, 64, 64)]
    assert [tuple(sources.shape) for _, sources in drawn] == [(16, 1, 1), (4, 2, 2), (1, 4, 4)]
    for _, sources in drawn:  # the paper's counts: every image in exactly one cell of each level
        assert sorted(sources.flatten().tolist()) == list(range(16))
    model.seed_montages(5)
    again = model.build_montages(views)
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(drawn, again, strict=True))
    model.seed_montages(6)
    assert not torch.equal(model.build_montages(views)[2][1], drawn[2][1])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_validation_returns_the_backbones_pooled_c5_for_the_knn_monitor(method):
    model = METHODS[method](levels=2).eval()
    images = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        features = model.validation_step((images, torch.arange(5)), 0)
        assert features.shape == (5, 512)  # ResNet-18's C5
        assert torch.equal(features, model.backbone.forward_pooled(images))


def test_the_parts_that_join_the_trainer_are_the_models_own():
    model = small_mcl(levels=2)
    monitor, guard, resume = model.configure_callbacks()
    assert isinstance(monitor, KNNMonitor) and monitor is model.knn_monitor
    assert isinstance(guard, DivergenceGuard) and guard is model.divergence_guard
    assert isinstance(resume, ConfiguredOptimizerOnResume) and resume.setup is model.optimizer_setup


def test_what_compiles_leaves_out_the_parts_a_method_does_not_have():
    tiles = small_supervised(levels=2)
    assert tiles.compiled_modules() == [tiles.backbone, tiles.head]
    pooled = small_supervised(levels=1, classifier_input="pooled_c5")
    assert pooled.neck is None and pooled.compiled_modules() == [pooled.backbone]


def test_a_method_without_a_target_has_nothing_to_update_after_a_step():
    model = small_supervised(levels=2)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    model.update_target(0.5)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
