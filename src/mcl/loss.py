"""Multi-level contrastive losses (SPEC §5): pure functions on embeddings, no Lightning."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

LEVEL_WEIGHT_RULES = ("paper", "official")
OFFICIAL_LEVEL_WEIGHTS = (0.5, 0.25, 0.125, 0.125)
LOSSES = ("infonce", "byol")
TARGET_ASSIGNMENTS = ("top",)


def level_weights(rule: str | Sequence[float], levels: int) -> list[float]:
    """Loss weight per level: ``"paper"`` ``1/2**(i+1)``, ``"official"`` ``[1/2, 1/4, 1/8, 1/8][:levels]``, or a list."""
    if isinstance(rule, str):
        if rule == "paper":
            return [1.0 / 2 ** (level + 1) for level in range(levels)]
        if rule == "official":
            return list(OFFICIAL_LEVEL_WEIGHTS[:levels])
        raise ValueError(f"level_weights={rule!r} is invalid: use one of {LEVEL_WEIGHT_RULES} or a list of {levels}")
    weights = [float(w) for w in rule]
    if len(weights) != levels or any(w < 0 for w in weights):
        raise ValueError(
            f"level_weights={list(rule)!r} is invalid: with levels={levels} it must list {levels} non-negative "
            f"weights, or be one of {LEVEL_WEIGHT_RULES}"
        )
    return weights


def info_nce(predictions: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over cosine logits, scaled by ``2 * temperature`` as in the released code.

    Args:
        predictions: ``(N, D)`` online predictions, one per cell.
        targets: ``(K, D)`` target embeddings of the whole (global) batch.
        labels: ``(N,)`` index into ``targets`` of each cell's positive.
    """
    logits = F.normalize(predictions.float(), dim=1) @ F.normalize(targets.float(), dim=1).T
    return F.cross_entropy(logits / temperature, labels) * (2 * temperature)


def byol_regression(predictions: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BYOL's ``2 - 2 cos(p, z+)``, averaged over cells; negatives are ignored."""
    positives = targets[labels]
    cosine = F.cosine_similarity(predictions.float(), positives.float(), dim=1)
    return (2 - 2 * cosine).mean()


def contrastive_loss(
    name: str, predictions: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    if name == "infonce":
        return info_nce(predictions, targets, labels, temperature)
    if name == "byol":
        return byol_regression(predictions, targets, labels)
    raise ValueError(f"loss={name!r} is invalid: use one of {LOSSES}")


@torch.no_grad()
def similarity_stats(predictions: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean cosine to the positive and to the negatives, and the embedding-collapse monitor.

    ``collapse_std`` is the per-dimension standard deviation of the L2-normalised predictions, averaged over
    dimensions: ``1/sqrt(D)`` for well spread embeddings, ``0`` when they collapse to a point.
    """
    p = F.normalize(predictions.float(), dim=1)
    z = F.normalize(targets.float(), dim=1)
    cosine = p @ z.T
    positive = torch.zeros_like(cosine, dtype=torch.bool)
    positive[torch.arange(len(labels), device=labels.device), labels] = True
    negatives = cosine[~positive]
    return {
        "pos_cos": cosine[positive].mean(),
        "neg_cos": negatives.mean() if negatives.numel() else cosine.new_zeros(()),
        "collapse_std": p.std(dim=0).mean() if len(p) > 1 else p.new_zeros(()),
    }
