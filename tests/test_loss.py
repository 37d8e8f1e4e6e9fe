import math

import pytest
import torch

from mcl.loss import byol_regression, info_nce, level_weights, similarity_stats


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
