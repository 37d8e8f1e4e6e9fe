"""Weighted k-nearest-neighbour classification of frozen features, the pretraining monitor."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


@torch.no_grad()
def knn_predict(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores ``(Q, num_classes)`` by a cosine-similarity-weighted vote of the ``k`` nearest bank entries.

    Each neighbour votes ``exp(cos / temperature)`` for its label. ``queries`` ``(Q, D)``, ``bank`` ``(N, D)``.
    """
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for chunk in F.normalize(queries.float(), dim=1).split(chunk_size):
        similarity, index = (chunk @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        votes.scatter_add_(1, bank_labels[index], (similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_top1(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy (in %) of :func:`knn_predict` on labelled queries."""
    num_classes = int(torch.cat([bank_labels, query_labels]).max()) + 1
    predicted = knn_predict(queries, bank, bank_labels, num_classes, k, temperature).argmax(dim=1)
    return 100.0 * (predicted == query_labels).float().mean().item()


class KNNAccuracy(Metric):
    """:func:`knn_top1` of labelled validation features against a labelled bank, both gathered batch by batch.

    ``update(features, labels, bank=True)`` adds bank entries, ``bank=False`` validation queries; ``features`` is
    ``(B, D)`` and ``labels`` ``(B,)``. The four states are lists concatenated across processes
    (``dist_reduce_fx="cat"``), so under DDP every rank scores all queries against the whole bank and computes the
    same value.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    STATES = ("bank_features", "bank_labels", "query_features", "query_labels")

    def __init__(self, k: int = 200, temperature: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        self.k = k
        self.temperature = temperature
        for name in self.STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor, labels: torch.Tensor, bank: bool) -> None:
        features = F.normalize(features.detach().float(), dim=1)
        if bank:
            self.bank_features.append(features)
            self.bank_labels.append(labels)
        else:
            self.query_features.append(features)
            self.query_labels.append(labels)

    @property
    def has_bank_and_queries(self) -> bool:
        """Whether both the bank and the queries have entries, so that :meth:`compute` has an answer."""
        return len(self.bank_features) > 0 and len(self.query_features) > 0

    def compute(self) -> torch.Tensor:
        """Top-1 accuracy in %, a 0-d tensor."""
        if not self.has_bank_and_queries:
            raise ValueError("the kNN monitor needs bank entries (bank=True) and queries (bank=False) to compute")
        accuracy = knn_top1(
            dim_zero_cat(self.query_features),
            dim_zero_cat(self.query_labels),
            dim_zero_cat(self.bank_features),
            dim_zero_cat(self.bank_labels),
            self.k,
            self.temperature,
        )
        return torch.tensor(accuracy, device=self.device)
