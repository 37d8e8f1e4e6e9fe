"""Multi-level contrastive losses (SPEC §5): pure functions on embeddings, no Lightning."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mcl.distributed import gather_batch, rank

LEVEL_WEIGHT_RULES = ("paper", "official")
OFFICIAL_LEVEL_WEIGHTS = (0.5, 0.25, 0.125, 0.125)
LOSSES = ("infonce", "byol")
TARGET_ASSIGNMENTS = ("top",)


def level_weights(rule: str | Sequence[float], levels: int) -> list[float]:
    """Loss weight per level.

    ``"paper"``: ``1/2**(i+1)``; ``"official"``: ``[1/2, 1/4, 1/8, 1/8][:levels]``; or an explicit list.
    """
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


def info_nce(
    predictions: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
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


def multi_level_loss(
    predictions: Sequence[Sequence[torch.Tensor]],
    sources: Sequence[Sequence[torch.Tensor]],
    targets: Sequence[torch.Tensor],
    weights: Sequence[float],
    loss: str = "infonce",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric multi-level loss with target assignment ``top`` (SPEC §5).

    Args:
        predictions: ``predictions[side][level]`` ``(N, D)``, the online predictions of the cells of one side's
            level-``level`` montages, in ``sources`` order.
        sources: ``sources[side][level]`` ``(N,)``, the local batch index of each cell's image.
        targets: ``targets[side]`` ``(B, D)``, the target embeddings of one side's level-0 views on this rank.
        weights: one weight per level.

    Side ``s`` is compared with the targets of side ``1 - s`` gathered from every rank, so the label of a cell is
    ``rank * B + source``. Returns ``sum_i w_i (loss_i(A->B) + loss_i(B->A))`` and per-level logs.
    """
    batch = len(targets[0])
    gathered = [gather_batch(t) for t in targets]
    offset = rank() * batch
    total = gathered[0].new_zeros((), dtype=torch.float32)
    logs: dict[str, torch.Tensor] = {}
    for level, weight in enumerate(weights):
        level_loss = total.new_zeros(())
        for side in range(2):
            labels = sources[side][level] + offset
            other = gathered[1 - side]
            level_loss = level_loss + contrastive_loss(loss, predictions[side][level], other, labels, temperature)
            if side == 0:
                stats = similarity_stats(predictions[side][level], other, labels)
        total = total + weight * level_loss
        logs[f"loss_level{level}"] = level_loss.detach()
        logs.update({f"{name}_level{level}": value for name, value in stats.items()})
    return total, logs
