"""The MCL LightningModule without a Trainer: loss against a reference, training signal, EMA, validation."""

import pytest
import torch
import torch.nn.functional as F

from mcl.heads import split_tiles
from mcl.loss import MultiLevelCrossEntropy, MultiLevelInfoNCE
from mcl.methods import MCL
from mcl.montage import assemble_levels
from mcl.sides import cell_sources

from .conftest import small_mcl, small_trunk


def reference_cells(backbone, neck, head, montages, level, tile=2):
    """Every cell's head feature, cell by cell: torchvision's full FPN forward (built on C3..C5 for 3 levels, so it
    returns P3, P4, P5), the cell's tile cut out of the level's map."""
    pyramid = neck(dict(enumerate(backbone(montages)[1:])))[2 - level]
    grid = 2**level
    cells = [
        head(pyramid[m : m + 1, :, row * tile : (row + 1) * tile, col * tile : (col + 1) * tile])
        for m in range(len(montages))
        for row in range(grid)
        for col in range(grid)
    ]
    return torch.cat(cells)


@pytest.mark.parametrize("assignment", ["top", "same-level", "all-levels"])
def test_total_loss_matches_an_independent_reference(assignment):
    """Eval mode (BN on running statistics) makes every image's embedding independent of its batch, so the loss can
    be recomputed cell by cell. ``top`` targets are the plain level-0 views; ``same-level`` and ``all-levels`` targets
    are the normalised mean of an image's target cells in the other side's level-``j`` montages."""
    model = small_mcl(levels=3, temperature=0.5, target_assignment=assignment).eval()
    batch, weights = 16, [0.5, 0.25, 0.125]
    views = torch.randn(batch, 2, 3, 3, 64, 64)
    with torch.no_grad():
        total, logs = model.forward_losses(views)
        model.seed_montages()  # replay the same montages
        sides = [model.build_montages(views[:, side]) for side in range(2)]
        target_net = (model.target_backbone, model.target_neck, model.target_head)
        targets = []  # targets[side][j]: (B, D) unit vectors
        for side in range(2):
            if assignment == "top":
                p5 = model.target_neck(dict(enumerate(model.target_backbone(views[:, side, 0])[1:])))[2]
                targets.append([F.normalize(model.target_projector(model.target_head(p5)), dim=1)])
                continue
            per_level = []
            for level, (montages, sources) in enumerate(sides[side]):
                z = F.normalize(model.target_projector(reference_cells(*target_net, montages, level)), dim=1)
                sums = torch.zeros(batch, z.shape[1]).index_add_(0, sources.flatten(), z)
                per_level.append(F.normalize(sums, dim=1))
            targets.append(per_level)
        expected = 0.0
        for level, weight in enumerate(weights):
            compared = {"top": [0], "same-level": [level], "all-levels": [0, 1, 2]}[assignment]
            for side in range(2):
                montages, sources = sides[side][level]
                cells = reference_cells(model.backbone, model.neck, model.head, montages, level)
                z = F.normalize(model.predictors[level](model.projector(cells)), dim=1)
                for j in compared:
                    logits = z @ targets[1 - side][j].T / 0.5
                    loss = F.cross_entropy(logits, sources.flatten()).item() * 2 * 0.5
                    expected += weight * loss / len(compared)
    assert total.item() == pytest.approx(expected, rel=1e-4)
    assert set(logs) >= {"loss_level0", "loss_level2", "pos_cos_level1", "collapse_std_level2"}


# all-levels asks one prediction to match several target levels, which the untrained target embeds differently, so
# its loss falls more slowly.
@pytest.mark.parametrize(
    ("assignment", "ratio", "steps"), [("top", 0.85, 20), ("same-level", 0.85, 20), ("all-levels", 0.92, 30)]
)
def test_a_few_steps_lower_the_loss(assignment, ratio, steps):
    torch.manual_seed(0)
    model = small_mcl(levels=2, target_assignment=assignment)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    # Two sides x two levels of views of the same 16 images.
    views = torch.randn(16, 1, 1, 3, 64, 64) + 0.2 * torch.randn(16, 2, 2, 3, 64, 64)
    losses = []
    for _ in range(steps):
        loss, _ = model.forward_losses(views)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < ratio * losses[0]


@pytest.mark.parametrize("assignment", ["top", "same-level"])
def test_targets_receive_no_gradient_and_predictors_have_no_target(assignment):
    model = small_mcl(target_assignment=assignment)
    loss, _ = model.forward_losses(torch.randn(8, 2, 2, 3, 64, 64))
    loss.backward()
    assert all(p.grad is None for _, target in model.momentum_pairs for p in target.parameters())
    assert all(p.grad is not None for p in model.predictors.parameters())
    online = {id(p) for online, _ in model.momentum_pairs for p in online.parameters()}
    assert not online & {id(p) for p in model.predictors.parameters()}


def test_each_rank_draws_its_own_montages(monkeypatch):
    model = small_mcl()
    views = torch.randn(16, 2, 2, 3, 64, 64)
    rank0 = [sources for _, sources in model.build_montages(views[:, 0])]
    model.seed_montages()
    monkeypatch.setattr("mcl.montage_streams.rank", lambda: 1)
    rank1 = [sources for _, sources in model.build_montages(views[:, 0])]
    assert model.generator.initial_seed() == model.seed * 1_000_003 + 1
    assert not torch.equal(rank0[1], rank1[1])


def test_seed_montages_replays_the_draws_of_a_generator_with_that_seed():
    views = torch.randn(16, 2, 3, 64, 64)
    expected = assemble_levels(views, 2, generator=torch.Generator().manual_seed(7))
    for run_seed in (0, 1):
        model = small_mcl(seed=run_seed)
        model.build_montages(views)
        model.seed_montages(7)
        drawn = model.build_montages(views)
        assert [torch.equal(a, b) for (_, a), (_, b) in zip(drawn, expected, strict=True)] == [True, True]
    model.seed_montages()
    assert model.generator.initial_seed() == 1 * 1_000_003  # back to the run's seed (1) on rank 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"levels": 5}, "levels=5"),
        ({"levels": 0}, "levels=0"),
        ({"image_size": 65}, "image_size=65"),
        ({"image_size": 16}, "image_size=16"),
        ({"montage_counts": [16]}, "montage_counts="),
        ({"target_assignment": "bottom"}, "target_assignment='bottom'"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"downscale_mode": "cubic"}, "downscale_mode='cubic'"),
        ({"base_momentum": 1.5}, "base_momentum=1.5"),
        ({"loss": MultiLevelInfoNCE(3)}, "loss.levels=3 but levels=2"),
        ({"loss": MultiLevelCrossEntropy(2)}, "MCL needs a MultiLevelContrastiveLoss loss .loss=infonce or loss=byol."),
    ],
)
def test_bad_configuration_is_rejected_with_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        small_mcl(**kwargs)


def test_the_loss_module_is_a_setting_of_the_model_not_a_weight():
    """The loss holds the level weights, temperature and target assignment; the hyper-parameters keep its config
    (plain values, loadable with weights_only) and the state dict has nothing of it."""
    model = small_mcl(levels=3, target_assignment="same-level", temperature=0.5)
    assert model.loss.level_weights == [0.5, 0.25, 0.125]
    assert model.hparams["loss"] == {
        "_target_": "mcl.loss.MultiLevelInfoNCE",
        "levels": 3,
        "level_weights": [0.5, 0.25, 0.125],
        "target_assignment": "same-level",
        "temperature": 0.5,
    }
    assert not any(key.startswith("loss.") for key in model.state_dict())
    default = MCL(**small_trunk(2))
    assert isinstance(default.loss, MultiLevelInfoNCE) and default.loss.settings() == MultiLevelInfoNCE(2).settings()


def test_views_that_do_not_match_the_model_are_rejected():
    model = small_mcl(levels=2)
    with pytest.raises(ValueError, match="views per side but levels=2"):
        model.forward_losses(torch.randn(4, 2, 3, 3, 64, 64))
    with pytest.raises(ValueError, match="image_size=64"):
        model.forward_losses(torch.randn(4, 2, 2, 3, 96, 96))
    with pytest.raises(ValueError, match="data.view_mode=byol views of 6 dimensions"):
        model.forward_losses(torch.randn(4, 2, 3, 64, 64))  # supervised views


@pytest.mark.parametrize("assignment", ["same-level", "all-levels"])
def test_batches_that_do_not_fill_every_level_still_give_a_finite_loss(assignment):
    """B = 20 with the paper rule: level 2 has one 4x4 montage, 16 cells, so 4 images have no level-2 target."""
    model = small_mcl(levels=3, target_assignment=assignment)
    loss, logs = model.forward_losses(torch.randn(20, 2, 3, 3, 64, 64))
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())


def replay(model, views):
    """Both sides' montages of ``views``, drawn from a fresh generator so that every call gets the same cells."""
    model.seed_montages()
    return [model.build_montages(views[:, side]) for side in range(2)]


def with_side_replaced(montages, side, level=None):
    """A copy of ``montages`` whose ``side`` (only its ``level`` when given) holds other images, same cell layout."""
    copy = [list(s) for s in montages]
    for lvl, (images, sources) in enumerate(copy[side]):
        if level is None or lvl == level:
            copy[side][lvl] = (torch.randn_like(images), sources)
    return copy


# B = 20 with the paper rule: 20, 5 and 1 montages per side at levels 0, 1 and 2, so 20, 20 and 16 cells.
CELLS_OF_20 = (20, 20, 16)


@pytest.mark.parametrize("bn_groups", ["per_side", "joint"])
def test_online_pass_gives_every_cell_a_prediction_keyed_by_side_and_level(bn_groups):
    model = small_mcl(levels=3, bn_groups=bn_groups)
    montages = replay(model, torch.randn(20, 2, 3, 3, 64, 64))
    with torch.no_grad():
        predictions = model.online_pass(montages)
    expected = {(side, level): (cells, 16) for side in (0, 1) for level, cells in enumerate(CELLS_OF_20)}
    assert {key: tuple(value.shape) for key, value in predictions.items()} == expected
    assert {key: (len(value), 16) for key, value in cell_sources(montages).items()} == expected


@pytest.mark.parametrize(("assignment", "target_levels"), [("top", 1), ("same-level", 3), ("all-levels", 3)])
def test_target_pass_gives_every_image_a_target_keyed_by_side_and_target_level(assignment, target_levels):
    """``top``: the plain views' level-0 embeddings only. Otherwise one target per image and level, and the images of
    no cell at a level masked out: level 2's one 4x4 montage shows 16 of the 20 images."""
    model = small_mcl(levels=3, target_assignment=assignment)
    views = torch.randn(20, 2, 3, 3, 64, 64)
    targets, present = model.target_pass(views, replay(model, views))
    keys = {(side, level) for side in (0, 1) for level in range(target_levels)}
    assert set(targets) == keys and all(value.shape == (20, 16) for value in targets.values())
    assert not any(value.requires_grad for value in targets.values())
    if assignment == "top":
        assert present is None
        return
    assert set(present) == keys and all(
        value.shape == (20,) and value.dtype == torch.bool for value in present.values()
    )
    assert [int(present[side, level].sum()) for side in (0, 1) for level in range(3)] == [20, 20, 16] * 2


@pytest.mark.parametrize("bn_groups", ["per_side", "per_side_plain_target", "joint"])
def test_sides_share_batchnorm_statistics_only_when_joint(bn_groups):
    """Train mode: under per-side grouping, side 0's predictions and targets do not depend on side 1's images."""
    model = small_mcl(levels=3, bn_groups=bn_groups)
    views = torch.randn(16, 2, 3, 3, 64, 64)
    montages = replay(model, views)
    other = with_side_replaced(montages, side=1)
    other_views = views.clone()
    other_views[:, 1] = torch.randn_like(views[:, 1])
    with torch.no_grad():
        online, changed = model.online_pass(montages), model.online_pass(other)
        target, _ = model.target_pass(views, montages)
        changed_target, _ = model.target_pass(other_views, other)
    shared = bn_groups == "joint"
    for level in range(3):
        assert torch.allclose(online[0, level], changed[0, level], atol=1e-6) != shared
    assert torch.allclose(target[0, 0], changed_target[0, 0], atol=1e-6) != shared


@pytest.mark.parametrize(("bn_groups", "sees_montages"), [("per_side", True), ("per_side_plain_target", False)])
def test_released_target_statistics_include_the_montages(bn_groups, sees_montages):
    """The released target network runs over a side's plain views and montages together and keeps level 0."""
    model = small_mcl(levels=3, bn_groups=bn_groups)
    views = torch.randn(16, 2, 3, 3, 64, 64)
    montages = replay(model, views)
    with torch.no_grad():
        target, present = model.target_pass(views, montages)
        changed, _ = model.target_pass(views, with_side_replaced(montages, side=0, level=2))
    assert present is None and set(target) == {(0, 0), (1, 0)}
    assert target[0, 0].shape == (16, 16)
    assert torch.allclose(target[0, 0], changed[0, 0], atol=1e-6) != sees_montages
    assert torch.allclose(target[1, 0], changed[1, 0], atol=1e-6)


def test_per_side_grouping_equals_separate_calls_per_side_and_level():
    """per_side: one trunk pass per side (backbone and neck over the side's levels together), then head, projector
    and predictor called per (side, level)."""
    model = small_mcl(levels=3, bn_groups="per_side")
    views = torch.randn(16, 2, 3, 3, 64, 64)
    montages = replay(model, views)
    with torch.no_grad():
        predictions = model.online_pass(montages)
        for side in range(2):
            images = [level_montages for level_montages, _ in montages[side]]
            features = model.backbone(torch.cat(images))
            maps = model.neck.forward_levels(features, [len(m) for m in images])
            for level, level_map in enumerate(maps):
                cells = model.head(split_tiles(level_map, 2**level))
                expected = model.predictors[level](model.projector(cells))
                assert torch.allclose(predictions[side, level], expected, atol=1e-6)


@pytest.mark.parametrize("assignment", ["top", "same-level"])
def test_groupings_agree_in_eval_mode(assignment):
    """BatchNorm on running statistics makes the grouping irrelevant: every choice then gives the same loss, so the
    passes route every cell to the same place."""
    views = torch.randn(16, 2, 3, 3, 64, 64)
    losses = []
    choices = ["per_side", "joint"] + (["per_side_plain_target"] if assignment == "top" else [])
    for bn_groups in choices:
        model = small_mcl(levels=3, bn_groups=bn_groups, target_assignment=assignment).eval()
        with torch.no_grad():
            losses.append(model.forward_losses(views)[0].item())
    assert losses == pytest.approx([losses[0]] * len(losses), rel=1e-5)


def test_plain_target_grouping_needs_top_targets():
    with pytest.raises(ValueError, match="bn_groups=per_side_plain_target needs loss.target_assignment=top"):
        small_mcl(bn_groups="per_side_plain_target", target_assignment="same-level")
    with pytest.raises(ValueError, match="bn_groups='sides'"):
        small_mcl(bn_groups="sides")
