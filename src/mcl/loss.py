"""Multi-level losses: pure functions on embeddings, and the configured loss modules that the methods call.

The functions take every setting as an argument; the modules (:class:`MultiLevelInfoNCE`, :class:`MultiLevelBYOL`,
:class:`MultiLevelCrossEntropy`) hold the level weights and the rest of a loss's settings, checked when the loss is
built. The self-supervised modules take the method's tensors keyed by ``(side, level)`` (:mod:`mcl.sides`) and
their target assignment (:mod:`mcl.targets`) and compute themselves: each says what one term is. No Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcl.distributed import gather_batch, rank
from mcl.montage import check_levels
from mcl.sides import SIDES, check_side_level_keys
from mcl.targets import build_target_assignment

LEVEL_WEIGHT_RULES = ("paper", "official")
OFFICIAL_LEVEL_WEIGHTS = (0.5, 0.25, 0.125, 0.125)


def resolve_level_weights(rule: str | Sequence[float], levels: int) -> list[float]:
    """Loss weight per level.

    ``"paper"``: ``1/2**(i+1)``; ``"official"``: ``[1/2, 1/4, 1/8, 1/8][:levels]`` (refused beyond 4 levels, which
    it has no weights for); or an explicit list.
    """
    if isinstance(rule, str):
        if rule == "paper":
            return [1.0 / 2 ** (level + 1) for level in range(levels)]
        if rule == "official":
            if levels > len(OFFICIAL_LEVEL_WEIGHTS):
                raise ValueError(
                    f"level_weights=official has weights for {len(OFFICIAL_LEVEL_WEIGHTS)} levels "
                    f"{list(OFFICIAL_LEVEL_WEIGHTS)}, not levels={levels}: give a list of {levels} weights"
                )
            return list(OFFICIAL_LEVEL_WEIGHTS[:levels])
        raise ValueError(f"level_weights={rule!r} is invalid: use one of {LEVEL_WEIGHT_RULES} or a list of {levels}")
    weights = [float(w) for w in rule]
    if len(weights) != levels or any(w < 0 for w in weights):
        raise ValueError(
            f"level_weights={list(rule)!r} is invalid: with levels={levels} it must list {levels} non-negative "
            f"weights, or be one of {LEVEL_WEIGHT_RULES}"
        )
    return weights


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


@torch.no_grad()
def similarity_stats(
    predictions: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Mean cosine to the positive and to the negatives, and the embedding-collapse monitor.

    ``collapse_std`` is the per-dimension standard deviation of the L2-normalised predictions, averaged over
    dimensions: ``1/sqrt(D)`` for well spread embeddings, ``0`` when they collapse to a point. With ``valid`` (the
    targets that exist), predictions of missing targets are left out and only valid targets are negatives; what is
    left empty gives 0. Computed in float32 outside autocast (under bf16 the cosines would be off by ~4e-3), with
    masks as weights rather than boolean indexing, so no value is read on the host.
    """
    with torch.autocast(predictions.device.type, enabled=False):
        p = F.normalize(predictions.float(), dim=1)
        z = F.normalize(targets.float(), dim=1)
        cosine = p @ z.T
    rows = torch.ones(len(labels), dtype=torch.bool, device=labels.device) if valid is None else valid[labels]
    columns = torch.ones(len(z), dtype=torch.bool, device=z.device) if valid is None else valid
    is_target = torch.zeros_like(cosine, dtype=torch.bool).scatter_(1, labels[:, None], True)
    positive = is_target & rows[:, None]
    negative = ~is_target & rows[:, None] & columns[None, :]
    kept = rows.sum()
    mean = (p * rows[:, None]).sum(0) / kept.clamp_min(1)
    variance = (((p - mean) ** 2) * rows[:, None]).sum(0) / (kept - 1).clamp_min(1)
    return {
        "pos_cos": (cosine * positive).sum() / positive.sum().clamp_min(1),
        "neg_cos": (cosine * negative).sum() / negative.sum().clamp_min(1),
        "collapse_std": torch.where(kept > 1, variance.sqrt().mean(), 0.0),
    }


def multi_level_cross_entropy(
    logits: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    weights: Sequence[float],
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum_i w_i * cross_entropy_i`` over the cells of every level, in float32; logs the loss and the accuracy (%)
    per level.

    Args:
        logits: per level ``i``, ``(N_i, num_classes)`` class logits, one row per montage cell.
        labels: per level ``i``, ``(N_i,)`` the class of each cell's image.
        weights: one weight per level.
    """
    total = logits[0].new_zeros((), dtype=torch.float32)
    logs: dict[str, torch.Tensor] = {}
    for level, (level_logits, level_labels, weight) in enumerate(zip(logits, labels, weights, strict=True)):
        loss = F.cross_entropy(level_logits.float(), level_labels, label_smoothing=label_smoothing)
        total = total + weight * loss
        logs[f"loss_level{level}"] = loss.detach()
        logs[f"acc_level{level}"] = (level_logits.argmax(1) == level_labels).float().mean().detach() * 100
    return total, logs


# --------------------------------------------------------------------------------------------------- modules
class MultiLevelLoss(nn.Module):
    """What the multi-level losses share: the level count and one weight per level, checked when the loss is built.

    Args:
        levels: montage levels, 1..4 (the method's ``levels``).
        level_weights: ``"paper"``, ``"official"`` or one non-negative weight per level
            (:func:`resolve_level_weights`); at least one positive.

    A loss has no parameters or buffers, so it adds nothing to a checkpoint's ``state_dict``; :meth:`config` is what
    a checkpoint keeps of it.
    """

    def __init__(self, levels: int, level_weights: str | Sequence[float] = "paper"):
        super().__init__()
        self.levels = check_levels(levels)
        self.level_weights = resolve_level_weights(level_weights, levels)
        if not any(self.level_weights):
            raise ValueError(
                f"level_weights={self.level_weights} is invalid: every level weight is 0, so the loss would be 0 and "
                "nothing would train; give at least one level a positive weight"
            )

    @classmethod
    def import_path(cls) -> str:
        """The import path that a config's ``_target_`` names this class by."""
        return f"{cls.__module__}.{cls.__qualname__}"

    def settings(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this loss, as plain values."""
        return {"levels": self.levels, "level_weights": list(self.level_weights)}

    def config(self) -> dict[str, Any]:
        """This loss as a config (``_target_`` and :meth:`settings`): what the methods save among their
        hyper-parameters, and what :func:`build_loss` reads back."""
        return {"_target_": self.import_path(), **self.settings()}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.settings().items())


class MultiLevelContrastiveLoss(MultiLevelLoss):
    """The symmetric multi-level loss of the self-supervised method, on tensors keyed by ``(side, level)``:
    subclasses say what one term is (:meth:`term`).

    Args:
        target_assignment: which target levels each online level is compared with, one of
            :data:`~mcl.targets.TARGET_ASSIGNMENTS` (the assignment, :attr:`assignment`, also makes the targets).
    """

    def __init__(self, levels: int, level_weights: str | Sequence[float] = "paper", target_assignment: str = "top"):
        super().__init__(levels, level_weights)
        self.assignment = build_target_assignment(target_assignment, self.levels)

    @property
    def target_assignment(self) -> str:
        return self.assignment.name

    @property
    def target_level_count(self) -> int:
        """How many target levels there are to compare with: level 0 only for ``top``, every level otherwise."""
        return self.assignment.target_levels

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "target_assignment": self.target_assignment}

    def term(
        self, predictions: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """The loss of ``(N, D)`` predictions against ``(K, D)`` targets of the global batch, ``labels`` ``(N,)``
        indexing each cell's positive; ``valid``: optional ``(K,)`` mask of the targets that exist."""
        raise NotImplementedError

    def forward(
        self,
        predictions: Mapping[tuple[int, int], torch.Tensor],
        sources: Mapping[tuple[int, int], torch.Tensor],
        targets: Mapping[tuple[int, int], torch.Tensor],
        present: Mapping[tuple[int, int], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and per-level logs (``loss_level{i}``, ``pos_cos_level{i}``, ``neg_cos_level{i}``,
        ``collapse_std_level{i}``).

        Args:
            predictions: ``(side, level)`` -> ``(N, D)`` online predictions of the cells of that side's level-``level``
                montages, in ``sources`` order; every side and level.
            sources: ``(side, level)`` -> ``(N,)`` the local batch index of each cell's image.
            targets: ``(side, j)`` -> ``(B, D)`` that side's target embeddings at target level ``j`` on this rank, for
                ``j < target_level_count`` (see :meth:`~mcl.targets.TargetAssignment.targets`).
            present: optional ``(side, j)`` -> ``(B,)`` masks of the images that have a target at level ``j``.

        Side ``s`` is compared with the targets of side ``1 - s`` gathered from every rank, so the label of a cell is
        ``rank * B + source``. Returns ``sum_i w_i (loss_i(A->B) + loss_i(B->A))``; with several target levels,
        ``loss_i`` is their mean. A cell whose image has no target at level ``j`` (too few montage slots for the
        batch) is left out of that term; the similarity logs are taken against the first assigned level.
        """
        levels, compared = range(self.levels), range(self.target_level_count)
        check_side_level_keys("predictions", predictions, levels)
        check_side_level_keys("sources", sources, levels)
        check_side_level_keys("targets", targets, compared)
        if present is not None:
            check_side_level_keys("present", present, compared)
        gathered = {(side, j): gather_batch(targets[side, j]) for side in SIDES for j in compared}
        masks = None
        if present is not None:
            masks = {
                (side, j): gather_batch(present[side, j].to(torch.uint8)).bool() for side in SIDES for j in compared
            }
        offset = rank() * len(targets[0, 0])
        total = gathered[0, 0].new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        for level, weight in enumerate(self.level_weights):
            target_levels = self.assignment.compared(level)
            level_loss = total.new_zeros(())
            for side in SIDES:
                labels = sources[side, level] + offset
                for j in target_levels:
                    other = gathered[1 - side, j]
                    valid = masks[1 - side, j] if masks is not None else None
                    term = self.term(predictions[side, level], other, labels, valid)
                    level_loss = level_loss + term / len(target_levels)
                    if side == 0 and j == target_levels[0]:  # logged against the first assigned target level
                        stats = similarity_stats(predictions[side, level], other, labels, valid)
            total = total + weight * level_loss
            logs[f"loss_level{level}"] = level_loss.detach()
            logs.update({f"{name}_level{level}": value for name, value in stats.items()})
        return total, logs


class MultiLevelInfoNCE(MultiLevelContrastiveLoss):
    """Multi-level InfoNCE (:func:`info_nce`): every cell against the other side's targets of the whole batch.

    Args:
        levels, level_weights: see :class:`MultiLevelLoss`.
        temperature: the softmax temperature ``T`` (> 0); each term is scaled by ``2T``.
        target_assignment: see :class:`MultiLevelContrastiveLoss`.
    """

    def __init__(
        self,
        levels: int,
        level_weights: str | Sequence[float] = "paper",
        temperature: float = 1.0,
        target_assignment: str = "top",
    ):
        super().__init__(levels, level_weights, target_assignment)
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} is invalid: it must be > 0")
        self.temperature = float(temperature)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "temperature": self.temperature}

    def term(
        self, predictions: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        return info_nce(predictions, targets, labels, self.temperature, valid)


class MultiLevelBYOL(MultiLevelContrastiveLoss):
    """Multi-level BYOL regression (:func:`byol_regression`, ``2 - 2 cos`` to the positive only, no negatives).

    Args: see :class:`MultiLevelContrastiveLoss`.
    """

    def term(
        self, predictions: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        return byol_regression(predictions, targets, labels, valid)


class MultiLevelCrossEntropy(MultiLevelLoss):
    """The supervised method's multi-level cross-entropy (:func:`multi_level_cross_entropy`).

    Args:
        levels, level_weights: see :class:`MultiLevelLoss`.
        label_smoothing: in ``[0, 1]``, as :func:`torch.nn.functional.cross_entropy` takes it.
    """

    def __init__(self, levels: int, level_weights: str | Sequence[float] = "paper", label_smoothing: float = 0.0):
        super().__init__(levels, level_weights)
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} is invalid: it must be in [0, 1]")
        self.label_smoothing = float(label_smoothing)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "label_smoothing": self.label_smoothing}

    def forward(
        self, logits: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and per-level logs (``loss_level{i}``, ``acc_level{i}``).

        Args:
            logits: per level ``i``, ``(N_i, num_classes)``, one row per montage cell.
            labels: per level ``i``, ``(N_i,)`` the class of each cell's image.
        """
        if len(logits) != self.levels or len(labels) != self.levels:
            raise ValueError(
                f"got logits for {len(logits)} and labels for {len(labels)} levels, but this loss has "
                f"levels={self.levels}"
            )
        return multi_level_cross_entropy(logits, labels, self.level_weights, self.label_smoothing)


def check_method_loss(loss: MultiLevelLoss, kind: type[MultiLevelLoss], method: Any, choices: str) -> MultiLevelLoss:
    """``loss`` once it is a ``kind`` (``choices``: the configs that build one) weighing ``method.levels`` levels."""
    if not isinstance(loss, kind):
        raise ValueError(
            f"{type(method).__name__} needs a {kind.__name__} loss ({choices}), not a {type(loss).__name__}"
        )
    if loss.levels != method.levels:
        raise ValueError(
            f"loss.levels={loss.levels} but levels={method.levels}: the loss weighs one term per montage level, so "
            "build it for the model's levels (the loss configs interpolate ${levels})"
        )
    return loss


LOSS_CLASSES: tuple[type[MultiLevelLoss], ...] = (MultiLevelInfoNCE, MultiLevelBYOL, MultiLevelCrossEntropy)


def build_loss(config: Mapping[str, Any]) -> MultiLevelLoss:
    """A loss from its :meth:`MultiLevelLoss.config`, e.g. as a checkpoint saved it. Only the loss classes of this
    module are built: a config read from a file names no other code to run."""
    classes = {cls.import_path(): cls for cls in LOSS_CLASSES}
    settings = dict(config)
    target = settings.pop("_target_", None)
    if target not in classes:
        raise ValueError(f"loss._target_={target!r} is invalid: use one of {sorted(classes)}")
    return classes[target](**settings)
