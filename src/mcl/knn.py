"""Weighted k-nearest-neighbour classification of frozen features, the pretraining monitor."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
