import math

import pytest
import torch
import torch.nn.functional as F

from mcl.loss import (
    MultiLevelBYOL,
    MultiLevelCrossEntropy,
    MultiLevelInfoNCE,
    build_loss,
    byol_regression,
    info_nce,
    multi_level_cross_entropy,
    multi_level_loss,
    per_image_targets,
    resolve_level_weights,
    similarity_stats,
    target_levels,
)


def reference_info_nce(p, z, labels, temperature):
    """Explicit loops in float64: -log softmax of the positive, averaged, times 2T."""
    total = 0.0
    for i, label in enumerate(labels.tolist()):
        pi = p[i].double() / p[i].double().norm()
        logits = [float(pi @ (zj.double() / zj.double().norm())) / temperature for zj in z]
        log_denominator = math.log(sum(math.exp(v) for v in logits))
        total += log_denominator - logits[label]
    return total / len(labels) * 2 * temperature


@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_info_nce_matches_reference(temperature):
    torch.manual_seed(0)
    p, z = torch.randn(12, 8), torch.randn(5, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 4, 4])
    assert info_nce(p, z, labels, temperature).item() == pytest.approx(reference_info_nce(p, z, labels, temperature))


def test_info_nce_of_perfect_predictions_with_orthogonal_targets():
    z = torch.eye(4)
    labels = torch.arange(4)
    expected = 2 * 0.5 * (math.log(math.exp(2) + 3) - 2)  # T = 0.5: positive logit 2, three negatives at 0
    assert info_nce(z * 3, z, labels, 0.5).item() == pytest.approx(expected)


def test_byol_regression():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [1.0, 0.0]])  # cos 1 with its target, cos 0 with its target
    assert byol_regression(p, z, torch.tensor([0, 1])).item() == pytest.approx((0 + 2) / 2)


def test_similarity_stats():
    z = torch.eye(3)
    stats = similarity_stats(z, z, torch.arange(3))
    assert stats["pos_cos"].item() == pytest.approx(1.0)
    assert stats["neg_cos"].item() == pytest.approx(0.0)
    collapsed = similarity_stats(torch.ones(4, 3), z, torch.zeros(4, dtype=torch.long))
    assert collapsed["collapse_std"].item() == pytest.approx(0.0)


def test_a_few_gradient_steps_lower_the_loss():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    p = torch.randn(8, 16, requires_grad=True)
    optimizer = torch.optim.SGD([p], lr=1.0)
    labels = torch.arange(8)
    losses = []
    for _ in range(20):
        loss = info_nce(p, z, labels, 0.2)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]


def test_level_weight_presets():
    assert resolve_level_weights("paper", 3) == [0.5, 0.25, 0.125]
    assert resolve_level_weights("official", 4) == [0.5, 0.25, 0.125, 0.125]
    assert resolve_level_weights([1, 0.5], 2) == [1.0, 0.5]


@pytest.mark.parametrize("rule", [[0.5, 0.25], [0.5, 0.25, 0.1, 0.1], [0.5, -1, 0.1], "uniform"])
def test_bad_level_weights_name_the_key(rule):
    with pytest.raises(ValueError, match="level_weights="):
        resolve_level_weights(rule, 3)


def test_official_weights_refuse_more_levels_than_they_have(monkeypatch):
    """preset=official's 4 weights never drop a 5th level from the loss in silence, were MAX_LEVELS raised."""
    with pytest.raises(ValueError, match=r"level_weights=official has weights for 4 levels .*, not levels=5"):
        resolve_level_weights("official", 5)
    monkeypatch.setattr("mcl.montage.MAX_LEVELS", 5)
    assert MultiLevelInfoNCE(5, level_weights="paper").level_weights[-1] == 1 / 32
    with pytest.raises(ValueError, match=r"level_weights=official has weights for 4 levels"):
        MultiLevelInfoNCE(5, level_weights="official")


def test_info_nce_drops_invalid_targets_from_the_negatives():
    torch.manual_seed(1)
    p, z = torch.randn(6, 8), torch.randn(5, 8)
    labels = torch.tensor([0, 2, 4, 0, 2, 4])
    valid = torch.tensor([True, False, True, False, True])
    kept = torch.tensor([0, 2, 4])
    expected = reference_info_nce(p, z[kept], torch.tensor([0, 1, 2, 0, 1, 2]), 0.3)
    assert info_nce(p, z, labels, 0.3, valid).item() == pytest.approx(expected)


def test_target_levels_per_assignment():
    assert [target_levels("top", level, 3) for level in range(3)] == [[0], [0], [0]]
    assert [target_levels("same-level", level, 3) for level in range(3)] == [[0], [1], [2]]
    assert target_levels("all-levels", 1, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="target_assignment='bottom'"):
        target_levels("bottom", 0, 3)


def test_per_image_targets_average_an_images_cells():
    cells = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 5.0], [1.0, 1.0]])
    sources = torch.tensor([2, 0, 2, 0])
    targets, present = per_image_targets(cells, sources, batch=4)
    assert present.tolist() == [True, False, True, False]
    root = 1 / math.sqrt(2)
    # image 0: unit (0, 1) + unit (1, 1) = (r, 1 + r); image 2: (1, 0) + (0, 1).
    expected0 = torch.tensor([root, 1 + root]) / math.hypot(root, 1 + root)
    torch.testing.assert_close(targets[0], expected0)
    torch.testing.assert_close(targets[2], torch.tensor([root, root]))
    assert targets[1].abs().sum() == 0 and targets[3].abs().sum() == 0


@pytest.mark.parametrize("assignment", ["top", "same-level", "all-levels"])
def test_multi_level_loss_compares_each_level_with_its_assigned_targets(assignment):
    torch.manual_seed(2)
    batch, dim, weights = 4, 8, [0.5, 0.25]
    sources = [[torch.tensor([3, 1, 0, 2]), torch.tensor([1, 1, 2, 0, 3, 3, 2, 0])] for _ in range(2)]
    predictions = [[torch.randn(len(s), dim) for s in side] for side in sources]
    targets = [[torch.randn(batch, dim) for _ in weights] for _ in range(2)]
    total, logs = multi_level_loss(
        predictions, sources, targets, weights, temperature=0.5, target_assignment=assignment
    )
    expected = 0.0
    for level, weight in enumerate(weights):
        compared = {"top": [0], "same-level": [level], "all-levels": [0, 1]}[assignment]
        for side in range(2):
            for j in compared:
                term = reference_info_nce(predictions[side][level], targets[1 - side][j], sources[side][level], 0.5)
                expected += weight * term / len(compared)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert set(logs) >= {"loss_level0", "loss_level1", "neg_cos_level1"}


@pytest.mark.parametrize("loss", ["infonce", "byol"])
def test_images_absent_from_a_target_level_are_neither_negatives_nor_positives(loss):
    """Image 2 has no target at this level: it is no negative, and the cell showing it is left out of the mean."""
    torch.manual_seed(3)
    batch, dim = 3, 4
    z = F.normalize(torch.randn(batch, dim), dim=1)
    present = [[torch.tensor([True, True, False])] for _ in range(2)]
    sources = [[torch.tensor([0, 1, 2])] for _ in range(2)]
    predictions = [[torch.randn(3, dim)] for _ in range(2)]
    masked, logs = multi_level_loss(predictions, sources, [[z], [z]], [1.0], loss, 0.5, present=present)
    kept_sources = [[torch.tensor([0, 1])] for _ in range(2)]
    kept = multi_level_loss([[p[0][:2]] for p in predictions], kept_sources, [[z[:2]], [z[:2]]], [1.0], loss, 0.5)[0]
    assert torch.isfinite(masked) and masked.item() == pytest.approx(kept.item(), rel=1e-6)
    assert torch.isfinite(logs["pos_cos_level0"])


# ------------------------------------------------------------------------------------------------ modules
def side_level_example(levels=2, batch=4, dim=8, target_levels=1, seed=4):
    """Predictions, sources, targets and presence masks keyed by ``(side, level)``: level ``i`` has ``B * 2**i``
    cells of random images, so an image may be in no cell of a level (and then has no target there)."""
    generator = torch.Generator().manual_seed(seed)
    keys = [(side, level) for side in (0, 1) for level in range(levels)]
    sources = {key: torch.randint(0, batch, (batch * 2 ** key[1],), generator=generator) for key in keys}
    predictions = {key: torch.randn(len(cells), dim, generator=generator) for key, cells in sources.items()}
    targets = {(side, j): torch.randn(batch, dim, generator=generator) for side in (0, 1) for j in range(target_levels)}
    present = {key: torch.zeros(batch, dtype=torch.bool).index_fill_(0, sources[key], True) for key in targets}
    return predictions, sources, targets, present


def nested(tensors, levels):
    return [[tensors[side, level] for level in range(levels)] for side in (0, 1)]


@pytest.mark.parametrize(
    ("loss", "objective", "temperature"),
    [
        (MultiLevelInfoNCE(2, [0.7, 0.3], temperature=0.3, target_assignment="top"), "infonce", 0.3),
        (MultiLevelInfoNCE(2, "official", temperature=0.5, target_assignment="same-level"), "infonce", 0.5),
        (MultiLevelInfoNCE(2, target_assignment="all-levels"), "infonce", 1.0),
        (MultiLevelBYOL(2, "paper", target_assignment="same-level"), "byol", 1.0),
    ],
    ids=["infonce-top", "infonce-same-level", "infonce-all-levels", "byol-same-level"],
)
def test_loss_module_equals_the_functional_loss(loss, objective, temperature):
    """The module is the function with its settings fixed: the same total and logs on reference inputs."""
    compared = loss.target_level_count
    predictions, sources, targets, present = side_level_example(target_levels=compared)
    masks = present if compared > 1 else None
    total, logs = loss(predictions, sources, targets, masks)
    expected, expected_logs = multi_level_loss(
        nested(predictions, 2),
        nested(sources, 2),
        nested(targets, compared),
        loss.level_weights,
        objective,
        temperature,
        loss.target_assignment,
        None if masks is None else nested(masks, compared),
    )
    assert total.item() == expected.item()
    assert logs.keys() == expected_logs.keys()
    assert all(torch.equal(logs[key], expected_logs[key]) for key in logs)


def test_infonce_module_matches_the_reference_loop():
    predictions, sources, targets, _ = side_level_example()
    total, logs = MultiLevelInfoNCE(2, [0.5, 0.25], temperature=0.2)(predictions, sources, targets)
    expected = sum(
        weight * reference_info_nce(predictions[side, level], targets[1 - side, 0], sources[side, level], 0.2)
        for level, weight in enumerate([0.5, 0.25])
        for side in (0, 1)
    )
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert set(logs) == {
        f"{name}_level{level}" for name in ("loss", "pos_cos", "neg_cos", "collapse_std") for level in (0, 1)
    }


def test_a_few_gradient_steps_lower_the_module_loss():
    predictions, sources, targets, _ = side_level_example()
    predictions = {key: p.requires_grad_() for key, p in predictions.items()}
    optimizer = torch.optim.SGD(predictions.values(), lr=1.0)
    loss = MultiLevelInfoNCE(2, temperature=0.2)
    losses = []
    for _ in range(20):
        total, _ = loss(predictions, sources, targets)
        losses.append(total.item())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MultiLevelInfoNCE(3, target_assignment="bottom"), "target_assignment='bottom' is invalid: use one of"),
        (lambda: MultiLevelBYOL(3, target_assignment="nearest"), "target_assignment='nearest' is invalid"),
        (lambda: MultiLevelInfoNCE(3, [0.5, -0.25, 0.25]), r"level_weights=\[0.5, -0.25, 0.25\] is invalid"),
        (
            lambda: MultiLevelInfoNCE(3, [0.5, 0.25]),
            r"level_weights=\[0.5, 0.25\] is invalid: with levels=3 it must list 3",
        ),
        (lambda: MultiLevelInfoNCE(2, "uniform"), "level_weights='uniform' is invalid: use one of"),
        (lambda: MultiLevelCrossEntropy(2, [0.0, 0.0]), "every level weight is 0"),
        (lambda: MultiLevelInfoNCE(3, temperature=0.0), "temperature=0.0 is invalid: it must be > 0"),
        (lambda: MultiLevelInfoNCE(5), "levels=5 is invalid"),
        (
            lambda: MultiLevelCrossEntropy(2, label_smoothing=1.5),
            r"label_smoothing=1.5 is invalid: it must be in \[0, 1\]",
        ),
    ],
)
def test_invalid_loss_settings_fail_at_construction_naming_the_key(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_loss_module_refuses_inputs_of_other_levels():
    predictions, sources, targets, _ = side_level_example(levels=2)
    loss = MultiLevelInfoNCE(3)
    with pytest.raises(ValueError, match=r"predictions are keyed .* needs \(side, level\) keys"):
        loss(predictions, sources, targets)
    with pytest.raises(ValueError, match="targets are keyed"):
        MultiLevelInfoNCE(2, target_assignment="same-level")(predictions, sources, targets)


@pytest.mark.parametrize(
    "loss",
    [
        MultiLevelInfoNCE(3, "official", temperature=0.2, target_assignment="all-levels"),
        MultiLevelBYOL(2, [0.6, 0.4]),
        MultiLevelCrossEntropy(1, label_smoothing=0.1),
    ],
)
def test_loss_config_rebuilds_the_same_loss(loss):
    config = loss.config()
    assert config["_target_"] == f"mcl.loss.{type(loss).__name__}"
    rebuilt = build_loss(config)
    assert type(rebuilt) is type(loss) and rebuilt.settings() == loss.settings()
    assert all(isinstance(value, str | int | float | list) for value in config.values())  # checkpoint-safe values


def test_build_loss_builds_only_this_modules_losses():
    with pytest.raises(
        ValueError, match=r"loss._target_='os.system' is invalid: use one of \['mcl.loss.MultiLevelBYOL'"
    ):
        build_loss({"_target_": "os.system", "command": "true"})


def test_cross_entropy_module_weights_each_levels_cross_entropy():
    generator = torch.Generator().manual_seed(5)
    logits = [torch.randn(n, 4, generator=generator) for n in (6, 24)]
    labels = [torch.randint(0, 4, (n,), generator=generator) for n in (6, 24)]
    total, logs = MultiLevelCrossEntropy(2, [0.6, 0.4], label_smoothing=0.1)(logits, labels)
    per_level = [F.cross_entropy(x, y, label_smoothing=0.1).item() for x, y in zip(logits, labels, strict=True)]
    assert total.item() == pytest.approx(0.6 * per_level[0] + 0.4 * per_level[1], rel=1e-6)
    assert logs["loss_level1"].item() == pytest.approx(per_level[1], rel=1e-6)
    accuracy = (logits[0].argmax(1) == labels[0]).float().mean().item() * 100
    assert logs["acc_level0"].item() == pytest.approx(accuracy)
    assert total.item() == multi_level_cross_entropy(logits, labels, [0.6, 0.4], 0.1)[0].item()
    with pytest.raises(ValueError, match="got logits for 1 and labels for 1 levels, but this loss has levels=2"):
        MultiLevelCrossEntropy(2)(logits[:1], labels[:1])
