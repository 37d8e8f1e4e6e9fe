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
    resolve_level_weights,
    similarity_stats,
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


def nested_example(batch=4, dim=8, seed=2):
    """Two levels of predictions and sources keyed by ``(side, level)``, and targets at two target levels."""
    generator = torch.Generator().manual_seed(seed)
    sources = {}
    for side in (0, 1):
        sources[side, 0] = torch.tensor([3, 1, 0, 2])
        sources[side, 1] = torch.tensor([1, 1, 2, 0, 3, 3, 2, 0])
    predictions = {key: torch.randn(len(s), dim, generator=generator) for key, s in sources.items()}
    targets = {(side, j): torch.randn(batch, dim, generator=generator) for side in (0, 1) for j in (0, 1)}
    return predictions, sources, targets


@pytest.mark.parametrize("assignment", ["top", "same-level", "all-levels"])
def test_the_loss_compares_each_level_with_its_assigned_targets(assignment):
    predictions, sources, targets = nested_example()
    weights = [0.5, 0.25]
    loss = MultiLevelInfoNCE(2, weights, temperature=0.5, target_assignment=assignment)
    if assignment == "top":
        targets = {key: value for key, value in targets.items() if key[1] == 0}
    total, logs = loss(predictions, sources, targets)
    expected = 0.0
    for level, weight in enumerate(weights):
        compared = {"top": [0], "same-level": [level], "all-levels": [0, 1]}[assignment]
        for side in range(2):
            for j in compared:
                term = reference_info_nce(predictions[side, level], targets[1 - side, j], sources[side, level], 0.5)
                expected += weight * term / len(compared)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert set(logs) >= {"loss_level0", "loss_level1", "neg_cos_level1"}


@pytest.mark.parametrize("loss", [MultiLevelInfoNCE(1, [1.0], 0.5), MultiLevelBYOL(1, [1.0])], ids=["infonce", "byol"])
def test_images_absent_from_a_target_level_are_neither_negatives_nor_positives(loss):
    """Image 2 has no target at this level: it is no negative, and the cell showing it is left out of the mean."""
    torch.manual_seed(3)
    batch, dim = 3, 4
    z = F.normalize(torch.randn(batch, dim), dim=1)
    present = {(side, 0): torch.tensor([True, True, False]) for side in (0, 1)}
    sources = {(side, 0): torch.tensor([0, 1, 2]) for side in (0, 1)}
    predictions = {(side, 0): torch.randn(3, dim) for side in (0, 1)}
    masked, logs = loss(predictions, sources, {(side, 0): z for side in (0, 1)}, present)
    kept_sources = {key: s[:2] for key, s in sources.items()}
    kept_predictions = {key: p[:2] for key, p in predictions.items()}
    kept = loss(kept_predictions, kept_sources, {(side, 0): z[:2] for side in (0, 1)})[0]
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


def reference_byol(p, z, labels, valid):
    """``2 - 2 cos`` to each kept cell's positive, in float64, averaged over the cells whose positive exists."""
    kept = [i for i, label in enumerate(labels.tolist()) if valid[label]]
    cosines = [F.cosine_similarity(p[i].double(), z[labels[i]].double(), dim=0).item() for i in kept]
    return sum(2 - 2 * c for c in cosines) / max(1, len(kept))


@pytest.mark.parametrize(
    "loss",
    [
        MultiLevelInfoNCE(2, [0.7, 0.3], temperature=0.3, target_assignment="top"),
        MultiLevelInfoNCE(2, "official", temperature=0.5, target_assignment="same-level"),
        MultiLevelBYOL(2, "paper", target_assignment="same-level"),
        MultiLevelBYOL(2, [0.6, 0.4], target_assignment="all-levels"),
    ],
    ids=["infonce-top", "infonce-same-level", "byol-same-level", "byol-all-levels"],
)
def test_loss_module_matches_the_reference_loop_on_side_level_inputs(loss):
    """Each module computes itself from ``(side, level)`` inputs: side ``s`` against side ``1 - s``'s targets at the
    assigned levels, masked where an image is absent, level-weighted."""
    compared = loss.target_level_count
    predictions, sources, targets, present = side_level_example(target_levels=compared)
    masks = present if compared > 1 else None
    total, logs = loss(predictions, sources, targets, masks)
    expected = 0.0
    for level, weight in enumerate(loss.level_weights):
        assigned = loss.assignment.compared(level)
        for side in (0, 1):
            for j in assigned:
                p, z, labels = predictions[side, level], targets[1 - side, j], sources[side, level]
                valid = torch.ones(len(z), dtype=torch.bool) if masks is None else masks[1 - side, j]
                if isinstance(loss, MultiLevelBYOL):
                    term = reference_byol(p, z, labels, valid)
                else:
                    kept = valid[labels]
                    remap = torch.cumsum(valid.long(), 0) - 1
                    term = reference_info_nce(p[kept], z[valid], remap[labels[kept]], loss.temperature)
                expected += weight * term / len(assigned)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    names = ("loss", "pos_cos", "neg_cos", "collapse_std")
    assert set(logs) == {f"{name}_level{level}" for name in names for level in (0, 1)}


def test_byol_has_no_temperature():
    loss = MultiLevelBYOL(2)
    assert not hasattr(loss, "temperature") and "temperature" not in loss.settings()


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
