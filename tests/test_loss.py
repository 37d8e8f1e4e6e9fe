import math

import pytest
import torch
import torch.nn.functional as F

from mcl.loss import (
    byol_regression,
    info_nce,
    level_weights,
    multi_level_loss,
    per_image_targets,
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
    assert level_weights("paper", 3) == [0.5, 0.25, 0.125]
    assert level_weights("official", 4) == [0.5, 0.25, 0.125, 0.125]
    assert level_weights([1, 0.5], 2) == [1.0, 0.5]


@pytest.mark.parametrize("rule", [[0.5, 0.25], [0.5, 0.25, 0.1, 0.1], [0.5, -1, 0.1], "uniform"])
def test_bad_level_weights_name_the_key(rule):
    with pytest.raises(ValueError, match="level_weights="):
        level_weights(rule, 3)


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
