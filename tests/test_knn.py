"""The weighted kNN monitor: a hand-checked example, the metric against the pure function, reset and DDP gathering."""

import math

import pytest
import torch

from mcl.knn import KNNAccuracy, knn_predict, knn_top1

# Bank (not unit length: the monitor compares directions). Against the query x = (1, 0, 0), A and B (class 0) have
# cosine 0.8 and C (class 1) 0.9; D and E are far away.
BANK = torch.tensor(
    [
        [0.8, -0.6, 0.0],  # A, class 0
        [0.8, 0.0, -0.6],  # B, class 0
        [0.9, math.sqrt(0.19), 0.0],  # C, class 1
        [0.0, 0.0, 2.0],  # D, class 1
        [0.0, -3.0, 0.0],  # E, class 0
    ]
)
BANK_LABELS = torch.tensor([0, 0, 1, 1, 0])
# With k = 3: x's neighbours are A, B, C, and C outvotes A + B when exp(0.9 / t) > 2 exp(0.8 / t), i.e. for a
# temperature t < 0.1 / ln 2 = 0.144. z = (0, 0, 1) is nearest to D (class 1), -y = (0, -1, 0) to E and A (class 0);
# -y is asked twice, once with a wrong label.
QUERIES = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [0.0, -1.0, 0.0]])
QUERY_LABELS = torch.tensor([1, 1, 0, 1])


def filled(metric: KNNAccuracy) -> KNNAccuracy:
    """``metric`` updated with the hand-made example, in uneven batches, bank and queries interleaved."""
    metric.update(BANK[:2], BANK_LABELS[:2], bank=True)
    metric.update(QUERIES[:1], QUERY_LABELS[:1], bank=False)
    metric.update(BANK[2:], BANK_LABELS[2:], bank=True)
    metric.update(QUERIES[1:], QUERY_LABELS[1:], bank=False)
    return metric


@pytest.mark.parametrize(
    ("temperature", "predicted", "accuracy"), [(0.1, [1, 1, 0, 0], 75.0), (1.0, [0, 1, 0, 0], 50.0)]
)
def test_hand_checked_example(temperature, predicted, accuracy):
    scores = knn_predict(QUERIES, BANK, BANK_LABELS, num_classes=2, k=3, temperature=temperature)
    assert scores.argmax(1).tolist() == predicted
    # x's votes: exp(0.9 / t) for class 1 and 2 exp(0.8 / t) for class 0.
    expected_votes = [2 * math.exp(0.8 / temperature), math.exp(0.9 / temperature)]
    assert scores[0].tolist() == pytest.approx(expected_votes, rel=1e-5)
    assert knn_top1(QUERIES, QUERY_LABELS, BANK, BANK_LABELS, k=3, temperature=temperature) == accuracy
    metric = filled(KNNAccuracy(k=3, temperature=temperature))
    assert metric.compute().item() == accuracy


def random_example(seed: int, bank_size: int = 120, num_queries: int = 50, dim: int = 16, classes: int = 5):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator)
    bank_labels = torch.randint(0, classes, (bank_size,), generator=generator)
    query_labels = torch.randint(0, classes, (num_queries,), generator=generator)
    bank = centres[bank_labels] + 1.5 * torch.randn(bank_size, dim, generator=generator)
    queries = centres[query_labels] + 1.5 * torch.randn(num_queries, dim, generator=generator)
    return queries, query_labels, bank, bank_labels


@pytest.mark.parametrize(("seed", "k", "temperature"), [(0, 200, 0.1), (1, 10, 0.07), (2, 1, 0.5)])
def test_metric_equals_the_pure_function_on_random_features(seed, k, temperature):
    queries, query_labels, bank, bank_labels = random_example(seed)
    metric = KNNAccuracy(k=k, temperature=temperature)
    for rows in torch.arange(len(bank)).split(37):
        metric.update(bank[rows], bank_labels[rows], bank=True)
    for rows in torch.arange(len(queries)).split(16):
        metric.update(queries[rows], query_labels[rows], bank=False)
    expected = knn_top1(queries, query_labels, bank, bank_labels, k=k, temperature=temperature)
    assert 0.0 < expected < 100.0
    assert metric.compute().item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric KNNAccuracy was called before")
def test_reset_clears_bank_and_queries():
    metric = KNNAccuracy(k=3)
    queries, query_labels, bank, bank_labels = random_example(0)
    metric.update(bank, bank_labels, bank=True)
    metric.update(queries, query_labels, bank=False)
    assert metric.has_bank_and_queries
    metric.reset()
    assert not metric.has_bank_and_queries
    assert all(state == [] for state in metric.metric_state.values())
    with pytest.raises(ValueError, match="needs bank entries"):
        metric.compute()
    # Only what comes after the reset counts.
    assert filled(metric).compute().item() == 75.0


def test_a_bank_without_queries_has_nothing_to_compute():
    metric = KNNAccuracy(k=3)
    metric.update(BANK, BANK_LABELS, bank=True)
    assert not metric.has_bank_and_queries
    with pytest.raises(ValueError, match=r"needs bank entries \(bank=True\) and queries \(bank=False\)"):
        metric.compute()


def test_states_are_concatenated_across_ranks():
    """A stand-in for ``all_gather`` reports a second rank that holds this rank's entries in reverse order: every
    state must be the concatenation of both, so ``compute`` scores 8 queries against a bank of 10."""

    def gather_two_ranks(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        return [tensor, tensor.flip(0)]

    synced = KNNAccuracy(k=3, temperature=1.0, dist_sync_fn=gather_two_ranks, distributed_available_fn=lambda: True)
    metric = filled(synced)
    assert set(metric.metric_state) == {"bank_features", "bank_labels", "query_features", "query_labels"}
    both = [torch.cat([t, t.flip(0)]) for t in (QUERIES, QUERY_LABELS, BANK, BANK_LABELS)]
    # Alone, x is misclassified at this temperature (50 %); in the doubled bank its neighbours are C, C and one of
    # A / B, so it is classified right.
    assert knn_top1(*both, k=3, temperature=1.0) == 75.0
    assert metric.compute().item() == 75.0
    assert len(metric.bank_features) == 2 and sum(len(f) for f in metric.bank_features) == 5  # local again
