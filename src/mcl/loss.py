"""Multi-level contrastive losses: pure functions on embeddings, no Lightning."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mcl.distributed import gather_batch, rank

LEVEL_WEIGHT_RULES = ("paper", "official")
OFFICIAL_LEVEL_WEIGHTS = (0.5, 0.25, 0.125, 0.125)
LOSSES = ("infonce", "byol")
TARGET_ASSIGNMENTS = ("top", "same-level", "all-levels")


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


def target_levels(assignment: str, level: int, levels: int) -> list[int]:
    """The target levels that online level ``level`` is compared with.

    ``top``: the plain level-0 view (the released code); ``same-level``: the target network's embedding of the same
    image at the same level; ``all-levels``: every target level, losses averaged.
    """
    if assignment == "top":
        return [0]
    if assignment == "same-level":
        return [level]
    if assignment == "all-levels":
        return list(range(levels))
    raise ValueError(f"target_assignment={assignment!r} is invalid: use one of {TARGET_ASSIGNMENTS}")


def per_image_targets(cells: torch.Tensor, sources: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One target per image from the target network's montage cells: the normalised mean of its cells.

    Args:
        cells: ``(N, D)`` target embeddings of a level's cells, in ``sources`` order.
        sources: ``(N,)`` batch index of each cell's image.

    Returns:
        ``(batch, D)`` unit targets (zero rows for images in no cell) and the ``(batch,)`` mask of images present.
    """
    unit = F.normalize(cells.float(), dim=1)
    sums = unit.new_zeros(batch, unit.shape[1]).index_add_(0, sources, unit)
    present = torch.zeros(batch, dtype=torch.bool, device=sources.device).index_fill_(0, sources, True)
    return F.normalize(sums, dim=1), present


def masked_mean(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the ``keep`` entries (all when ``None``); 0 when none is kept. No host sync."""
    if keep is None:
        return values.mean()
    return (values * keep).sum() / keep.sum().clamp_min(1)


def info_nce(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE over cosine logits, scaled by ``2 * temperature`` as in the released code; logits in float32 even
    under autocast.

    Args:
        predictions: ``(N, D)`` online predictions, one per cell.
        targets: ``(K, D)`` target embeddings of the whole (global) batch.
        labels: ``(N,)`` index into ``targets`` of each cell's positive.
        valid: optional ``(K,)`` mask of the targets that exist (images absent from a target level do not): the
            others are no negatives, and cells whose positive does not exist are left out of the mean.
    """
    with torch.autocast(predictions.device.type, enabled=False):
        logits = F.normalize(predictions.float(), dim=1) @ F.normalize(targets.float(), dim=1).T
        keep = None
        if valid is not None:
            keep = valid[labels]
            logits = torch.where(keep[:, None], logits.masked_fill(~valid, float("-inf")), logits)
        per_cell = F.cross_entropy(logits / temperature, labels, reduction="none")
        return masked_mean(per_cell, keep) * (2 * temperature)


def byol_regression(
    predictions: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """BYOL's ``2 - 2 cos(p, z+)``, averaged over the cells whose positive exists (``valid``); no negatives."""
    with torch.autocast(predictions.device.type, enabled=False):
        cosine = F.cosine_similarity(predictions.float(), targets[labels].float(), dim=1)
        return masked_mean(2 - 2 * cosine, valid[labels] if valid is not None else None)


def contrastive_loss(
    name: str,
    predictions: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    if name == "infonce":
        return info_nce(predictions, targets, labels, temperature, valid)
    if name == "byol":
        return byol_regression(predictions, targets, labels, valid)
    raise ValueError(f"loss={name!r} is invalid: use one of {LOSSES}")


@torch.no_grad()
def similarity_stats(
    predictions: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Mean cosine to the positive and to the negatives, and the embedding-collapse monitor.

    ``collapse_std`` is the per-dimension standard deviation of the L2-normalised predictions, averaged over
    dimensions: ``1/sqrt(D)`` for well spread embeddings, ``0`` when they collapse to a point.
    """
    if valid is not None:
        keep = valid[labels]
        predictions, labels = predictions[keep], labels[keep]
    if not len(predictions):
        zero = targets.new_zeros((), dtype=torch.float32)
        return {"pos_cos": zero, "neg_cos": zero, "collapse_std": zero}
    p = F.normalize(predictions.float(), dim=1)
    z = F.normalize(targets.float(), dim=1)
    cosine = p @ z.T
    positive = torch.zeros_like(cosine, dtype=torch.bool)
    positive[torch.arange(len(labels), device=labels.device), labels] = True
    negative = ~positive if valid is None else ~positive & valid
    negatives = cosine[negative]
    return {
        "pos_cos": cosine[positive].mean(),
        "neg_cos": negatives.mean() if negatives.numel() else cosine.new_zeros(()),
        "collapse_std": p.std(dim=0).mean() if len(p) > 1 else p.new_zeros(()),
    }


def multi_level_loss(
    predictions: Sequence[Sequence[torch.Tensor]],
    sources: Sequence[Sequence[torch.Tensor]],
    targets: Sequence[Sequence[torch.Tensor]],
    weights: Sequence[float],
    loss: str = "infonce",
    temperature: float = 1.0,
    target_assignment: str = "top",
    present: Sequence[Sequence[torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric multi-level loss.

    Args:
        predictions: ``predictions[side][level]`` ``(N, D)``, the online predictions of the cells of one side's
            level-``level`` montages, in ``sources`` order.
        sources: ``sources[side][level]`` ``(N,)``, the local batch index of each cell's image.
        targets: ``targets[side][j]`` ``(B, D)``, one side's target embeddings at target level ``j`` on this rank:
            level 0 only for ``top``, one per level otherwise (see :func:`per_image_targets`).
        weights: one weight per level.
        target_assignment: which target levels each online level is compared with (:func:`target_levels`).
        present: optional ``present[side][j]`` ``(B,)`` masks of the images that have a target at level ``j``.

    Side ``s`` is compared with the targets of side ``1 - s`` gathered from every rank, so the label of a cell is
    ``rank * B + source``. Returns ``sum_i w_i (loss_i(A->B) + loss_i(B->A))`` and per-level logs; with several
    target levels, ``loss_i`` is their mean. A cell whose image has no target at level ``j`` (too few montage slots
    for the batch) is left out of that term; the similarity logs are taken against the first assigned level.
    """
    batch = len(targets[0][0])
    gathered = [[gather_batch(t) for t in side] for side in targets]
    masks = [[gather_batch(m.to(torch.uint8)).bool() for m in side] for side in present] if present else None
    offset = rank() * batch
    total = gathered[0][0].new_zeros((), dtype=torch.float32)
    logs: dict[str, torch.Tensor] = {}
    for level, weight in enumerate(weights):
        compared = target_levels(target_assignment, level, len(weights))
        level_loss = total.new_zeros(())
        for side in range(2):
            labels = sources[side][level] + offset
            for j in compared:
                other = gathered[1 - side][j]
                valid = masks[1 - side][j] if masks is not None else None
                term = contrastive_loss(loss, predictions[side][level], other, labels, temperature, valid)
                level_loss = level_loss + term / len(compared)
                if side == 0 and j == compared[0]:  # logged against the first assigned target level
                    stats = similarity_stats(predictions[side][level], other, labels, valid)
        total = total + weight * level_loss
        logs[f"loss_level{level}"] = level_loss.detach()
        logs.update({f"{name}_level{level}": value for name, value in stats.items()})
    return total, logs
