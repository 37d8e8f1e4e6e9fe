"""The MCL LightningModule without a Trainer: loss against a reference, training signal, EMA, validation."""

import pytest
import torch
import torch.nn.functional as F

from mcl.methods import MCL

from .conftest import small_trunk


def small_mcl(levels=2, **kwargs):
    return MCL(**small_trunk(levels, **{"projector_hidden_dim": 32, "embedding_dim": 16, **kwargs}))


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
        model._generator = None  # replay the same montages
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
# its loss has a higher floor within a few steps.
@pytest.mark.parametrize(("assignment", "ratio"), [("top", 0.85), ("same-level", 0.85), ("all-levels", 0.92)])
def test_a_few_steps_lower_the_loss(assignment, ratio):
    torch.manual_seed(0)
    model = small_mcl(levels=2, target_assignment=assignment)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    # Two sides x two levels of views of the same 16 images.
    views = torch.randn(16, 1, 1, 3, 64, 64) + 0.2 * torch.randn(16, 2, 2, 3, 64, 64)
    losses = []
    for _ in range(20):
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
    model._generator = None
    monkeypatch.setattr("mcl.methods.base.rank", lambda: 1)
    rank1 = [sources for _, sources in model.build_montages(views[:, 0])]
    assert model.generator.initial_seed() == model.seed * 1_000_003 + 1
    assert not torch.equal(rank0[1], rank1[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"levels": 5}, "levels=5"),
        ({"levels": 0}, "levels=0"),
        ({"image_size": 65}, "image_size=65"),
        ({"image_size": 16}, "image_size=16"),
        ({"level_weights": [0.5, 0.5, 0.5]}, "level_weights="),
        ({"montage_counts": [16]}, "montage_counts="),
        ({"loss": "mse"}, "loss='mse'"),
        ({"target_assignment": "bottom"}, "target_assignment='bottom'"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"downscale_mode": "cubic"}, "downscale_mode='cubic'"),
        ({"base_momentum": 1.5}, "base_momentum=1.5"),
    ],
)
def test_bad_configuration_is_rejected_with_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        small_mcl(**kwargs)


def test_views_that_do_not_match_the_model_are_rejected():
    model = small_mcl(levels=2)
    with pytest.raises(ValueError, match="views per side but levels=2"):
        model.forward_losses(torch.randn(4, 2, 3, 3, 64, 64))
    with pytest.raises(ValueError, match="image_size=64"):
        model.forward_losses(torch.randn(4, 2, 2, 3, 96, 96))


def test_non_finite_loss_stops_before_the_step():
    model = small_mcl()
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        model.check_finite(torch.tensor(float("nan")), batch_idx=3)


@pytest.mark.parametrize("assignment", ["same-level", "all-levels"])
def test_batches_that_do_not_fill_every_level_still_give_a_finite_loss(assignment):
    """B = 20 with the paper rule: level 2 has one 4x4 montage, 16 cells, so 4 images have no level-2 target."""
    model = small_mcl(levels=3, target_assignment=assignment)
    loss, logs = model.forward_losses(torch.randn(20, 2, 3, 3, 64, 64))
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
