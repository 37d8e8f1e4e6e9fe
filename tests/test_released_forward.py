"""``method.all_pyramid_maps``: the released code's train-mode forward on identical inputs.

The reference is ``benchmarks/parity.py``'s :func:`released_forward`: the released code's ``MCL.forward_train``
(GuoQiushan/MCL, on OpenSelfSup and mmdet) written from its formulas on the library's modules (same weights):

- encoder = backbone -> FPN -> ``DetConvGpNonLinearHead``, called once per augmentation side on that side's plain
  views (batch order) and montages of all levels, concatenated, for the online and then the target network;
- mmdet's ``FPN.forward``: every lateral conv (1x1 conv + BN) over all images, the nearest top-down sums, every output
  conv (3x3 conv + BN) over all images, P2..P5;
- ``DetConvGpNonLinearHead.forward``: for each map, finest first, the map of every image cut into ``t x t`` tiles
  (``reshape(N, c, n, t, n, t).permute(0, 2, 4, 1, 3, 5)``), the stacked convs, ``t x t`` average pooling and the
  projector MLP over all tiles of the map, ``(N, n * n, D)``;
- level ``i`` reads map ``-(i + 1)`` (``P(5-i)``) of its own images (rows ``img_num_idx[i-1]:img_num_idx[i]``);
  the targets are the target network's normalised P5 embeddings of the plain views (rows ``:B``);
- ``LatentMultiPredictContrastHead``: predictor ``i``, normalised, cosine logits against the other side's targets,
  ``cross_entropy(logits / T, labels) * 2T * w_i``, summed over both sides and all levels.
"""

import copy
import importlib

import pytest
import torch

from mcl.loss import MultiLevelInfoNCE
from mcl.methods import MCL, SupervisedMultiLevel

from .conftest import small_trunk

# The released recipe's 4 levels (montages B, B/4, B/16, B/32, weights 1/2, 1/4, 1/8, 1/8) at B = 32, 64 px, where
# tiles are 2 x 2 (the released 7 x 7 at 224 px) and level 3 has one 8 x 8 montage.
BATCH, SIZE, LEVELS = 32, 64, 4


@pytest.fixture(scope="module")
def parity():
    """``benchmarks/parity.py`` as a module, imported in this process."""
    return importlib.import_module("benchmarks.parity")


def official_mcl(all_pyramid_maps: bool) -> MCL:
    """A small MCL (ResNet-18, 16-channel pyramid, 16-d embeddings) with the released montage counts and weights."""
    loss = MultiLevelInfoNCE(LEVELS, level_weights="official")
    return MCL(
        **small_trunk(LEVELS),
        montage_counts="official",
        loss=loss,
        projector_hidden_dim=32,
        embedding_dim=16,
        all_pyramid_maps=all_pyramid_maps,
    )


def batchnorm_statistics(model):
    """Every BatchNorm buffer (running mean and variance, batches tracked) of both networks and the predictors."""
    return {name: value for name, value in model.state_dict().items() if "running_" in name or "num_batches" in name}


def test_all_pyramid_maps_is_the_released_train_mode_forward(parity):
    """Same weights, views and cells: the loss, every prediction and every BatchNorm running statistic (which samples
    each BatchNorm normalised over, one update per call, in the same order) agree with the released forward. Without
    the switch the backbones' statistics still agree, and the loss, the predictions and the statistics of everything
    after the backbones differ."""
    views = torch.randn(BATCH, 2, LEVELS, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    initial = official_mcl(all_pyramid_maps=True)
    library, released = copy.deepcopy(initial), copy.deepcopy(initial)
    with torch.no_grad():
        loss, logs, montages, predictions = parity.library_forward(library, views, seed=3)
        expected, expected_levels, expected_predictions = parity.released_forward(released, views, montages)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert [logs[f"loss_level{i}"].item() for i in range(LEVELS)] == pytest.approx(
        [value.item() for value in expected_levels], rel=1e-5
    )
    reference = parity.aligned(expected_predictions, montages)  # the library's plain views are in a random order
    assert reference.keys() == predictions.keys()
    for key, value in predictions.items():
        assert torch.allclose(value, reference[key], atol=1e-4), key
    statistics, expected_statistics = batchnorm_statistics(library), batchnorm_statistics(released)
    assert statistics.keys() == expected_statistics.keys()
    for name, value in statistics.items():
        assert torch.allclose(value.float(), expected_statistics[name].float(), rtol=1e-4, atol=1e-5), name

    cheaper = official_mcl(all_pyramid_maps=False)
    cheaper.load_state_dict(initial.state_dict())
    with torch.no_grad():
        cheaper_loss, _, _, cheaper_predictions = parity.library_forward(cheaper, views, seed=3)
    assert abs(cheaper_loss.item() - expected.item()) > 1e-4
    assert not torch.allclose(cheaper_predictions[0, 3], reference[0, 3], atol=1e-3)
    differing = {
        name.split(".")[0]
        for name, value in batchnorm_statistics(cheaper).items()
        if not torch.allclose(value.float(), expected_statistics[name].float(), rtol=1e-4, atol=1e-5)
    }
    assert differing == {"neck", "head", "projector", "predictors", "target_neck", "target_head", "target_projector"}


@pytest.mark.parametrize("neck", [{"name": "fpn", "out_channels": 16}, {"name": "interp", "out_channels": 16}])
def test_all_pyramid_maps_keeps_the_cells_of_every_level_in_eval_mode(parity, neck):
    """On running statistics every cell's embedding is independent of the other images, so the switch changes no
    value: each level keeps its own images' rows of its own map, in the same order, for any neck."""
    views = torch.randn(16, 2, 3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    results = []
    for all_maps in (False, True):
        model = MCL(**small_trunk(3, neck=neck, projector_hidden_dim=32, embedding_dim=16, all_pyramid_maps=all_maps))
        with torch.no_grad():
            model.eval()
            results.append(parity.library_forward(model, views, seed=3))
    (loss, _, _, predictions), (all_maps_loss, _, _, all_maps_predictions) = results
    assert all_maps_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert predictions.keys() == all_maps_predictions.keys()
    for key, value in predictions.items():
        assert torch.allclose(all_maps_predictions[key], value, atol=1e-5), key


def test_the_supervised_method_keeps_its_cells_with_all_pyramid_maps():
    views, labels = torch.randn(16, 3, 3, 64, 64), torch.arange(16) % 10
    losses = []
    for all_maps in (False, True):
        model = SupervisedMultiLevel(**small_trunk(3, all_pyramid_maps=all_maps)).eval()
        model.seed_montages(0)
        with torch.no_grad():
            losses.append(model.forward_losses(views, labels)[0].item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("bn_groups", ["joint", "per_side_plain_target"])
def test_all_pyramid_maps_needs_the_released_grouping(bn_groups):
    with pytest.raises(ValueError, match=f"all_pyramid_maps=true needs bn_groups=per_side, not '{bn_groups}'"):
        MCL(**small_trunk(2, bn_groups=bn_groups, all_pyramid_maps=True))
