"""One pass over a composed config that names every numeric value out of its range, before anything is built.

A learning rate of 0 trains nothing, a momentum of 1.5 diverges, ``max_epochs=0`` "finishes" with no metrics and
``knn_k=0`` makes the kNN monitor score chance; others fail deep inside a library with a message that names no key.
:func:`check_config` reads the config as it was typed (before the lr is scaled by the batch), and raises one
:class:`ConfigError` that lists, for each wrong value, the key, the value given and the valid range. Keys a config
does not have are skipped, so the same rules serve ``mcl-train``, ``mcl-linear`` and ``mcl-finetune``.

Light to import (no torch): the entry points check before torch and Lightning load.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mcl.cluster import devices_per_node


class ConfigError(ValueError):
    """Config values out of their valid ranges; the message lists each one."""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


@dataclass(frozen=True)
class Range:
    """A numeric range: ``low``/``high`` bounds (``None``: open), whether each is included, integers only, whether
    ``null`` is allowed, extra single values allowed (``-1`` for "no limit"), and whether a name (text) is allowed
    instead of a number (checked where the name is used, e.g. ``loss.level_weights=paper``)."""

    low: float | None = None
    high: float | None = None
    low_included: bool = True
    high_included: bool = True
    integer: bool = False
    nullable: bool = False
    also: tuple[Any, ...] = ()
    named: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, str):
            return self.named
        if value in self.also and _number(value):
            return True
        if not (_integer(value) if self.integer else _number(value)) or math.isnan(value):
            return False
        if self.low is not None and (value < self.low if self.low_included else value <= self.low):
            return False
        return not (self.high is not None and (value > self.high if self.high_included else value >= self.high))

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "[" if self.low_included else "(", "]" if self.high_included else ")"
            text = f"{kind} in {left}{_shown(self.low)}, {_shown(self.high)}{right}"
        elif self.low is not None:
            text = f"{kind} {'>=' if self.low_included else '>'} {_shown(self.low)}"
        elif self.high is not None:
            text = f"{kind} {'<=' if self.high_included else '<'} {_shown(self.high)}"
        else:
            text = kind
        extras = [str(value) for value in self.also] + (["null"] if self.nullable else [])
        return text + "".join(f" or {extra}" for extra in extras)


POSITIVE = Range(low=0, low_included=False)
NON_NEGATIVE = Range(low=0)
PROBABILITY = Range(low=0, high=1)
AT_LEAST_ONE = Range(low=1, integer=True)
MOMENTUM = Range(low=0, high=1, high_included=False)

# key -> (valid range, what the value does); a key holding a list is checked item by item.
RULES: dict[str, tuple[Range, str]] = {
    "seed": (Range(low=0, high=2**32 - 1, integer=True), "the seed of everything"),
    "batch_size": (AT_LEAST_ONE, "images per device and step"),
    "lr_reference_batch": (Range(low=0, low_included=False, nullable=True), "the batch the base lr is given for"),
    "optimizer.lr": (POSITIVE, "the base learning rate"),
    "optimizer.momentum": (MOMENTUM, "the optimiser's momentum"),
    "optimizer.weight_decay": (NON_NEGATIVE, "the weight decay"),
    "optimizer.betas": (MOMENTUM, "AdamW's moment decay rates"),
    "optimizer.eps": (POSITIVE, "the optimiser's epsilon"),
    "optimizer.trust_coeff": (POSITIVE, "LARS's trust coefficient"),
    "scheduler.warmup_epochs": (NON_NEGATIVE, "epochs of warmup"),
    "scheduler.warmup_steps": (Range(low=0, integer=True, nullable=True), "steps of warmup"),
    "scheduler.warmup_ratio": (Range(low=0, high=1, low_included=False), "the lr factor the warmup starts from"),
    "scheduler.min_lr_ratio": (Range(low=0, high=1, high_included=False), "the lr floor as a fraction of the peak"),
    "trainer.max_epochs": (AT_LEAST_ONE, "epochs to train"),
    "trainer.max_steps": (Range(low=1, integer=True, also=(-1,)), "steps to train (-1: set by max_epochs)"),
    "trainer.accumulate_grad_batches": (AT_LEAST_ONE, "batches per optimiser step"),
    "trainer.gradient_clip_val": (Range(low=0, nullable=True), "the gradient norm clip"),
    "trainer.log_every_n_steps": (AT_LEAST_ONE, "steps between logged values"),
    "trainer.num_nodes": (AT_LEAST_ONE, "nodes"),
    "data.batch_size": (AT_LEAST_ONE, "images per device and step"),
    "data.eval_batch_size": (AT_LEAST_ONE, "images per evaluation batch"),
    "data.num_workers": (Range(low=0, integer=True), "DataLoader worker processes"),
    "data.views_per_side": (AT_LEAST_ONE, "views per image and side"),
    "data.min_scale": (Range(low=0, high=1, low_included=False), "the smallest crop's area fraction"),
    "data.jitter_p": (PROBABILITY, "the colour jitter probability"),
    "data.grayscale_p": (PROBABILITY, "the grayscale probability"),
    "method.knn_k": (AT_LEAST_ONE, "neighbours of the kNN monitor"),
    "method.knn_temperature": (POSITIVE, "the kNN monitor's temperature"),
    "method.base_momentum": (Range(low=0, high=1), "the EMA momentum at the start"),
    "method.final_momentum": (Range(low=0, high=1), "the EMA momentum at the end"),
    "method.finite_check_every": (AT_LEAST_ONE, "steps between checks of the non-finite record"),
    "method.max_weight_norm_ratio": (Range(low=1, low_included=False, nullable=True), "the weight-norm stop"),
    "method.online_probe_lr": (POSITIVE, "the online probe's learning rate"),
    "method.online_probe_momentum": (MOMENTUM, "the online probe's SGD momentum"),
    "method.online_probe_weight_decay": (NON_NEGATIVE, "the online probe's weight decay"),
    "loss.temperature": (POSITIVE, "the InfoNCE temperature"),
    "loss.level_weights": (Range(low=0, named=True), "a level's loss weight"),
    "loss.label_smoothing": (Range(low=0, high=1, high_included=False), "the label smoothing"),
    "callbacks.last.every_n_train_steps": (Range(low=1, integer=True, nullable=True), "steps between last.ckpt"),
    "callbacks.pictures.max_images": (AT_LEAST_ONE, "the batch images in views.png"),
    "callbacks.pictures.max_montages": (AT_LEAST_ONE, "the montages per side of a level's picture"),
    "callbacks.pictures.feature_points": (AT_LEAST_ONE, "the bank features in the feature map"),
}


def _value(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """``(present, value)`` of ``key``, resolved; keys that need Hydra's runtime (outside a run) count as absent."""
    try:
        node = OmegaConf.select(cfg, key, default="\0missing", throw_on_missing=False)
    except Exception:  # an interpolation that only resolves inside a Hydra run
        return False, None
    if isinstance(node, str) and node == "\0missing":
        return False, None
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    return True, node


def _is_mcl(cfg: DictConfig) -> bool:
    return str(OmegaConf.select(cfg, "method._target_", default="") or "").endswith(".MCL")


def _global_batch(cfg: DictConfig) -> list[str]:
    """InfoNCE needs at least two targets per step: a global batch of one trains nothing (the loss is 0)."""
    batch = OmegaConf.select(cfg, "batch_size", default=None)
    if not _is_mcl(cfg) or not _integer(batch) or batch < 1:
        return []
    trainer = cfg.get("trainer") or {}
    devices = devices_per_node(trainer)
    nodes = trainer.get("num_nodes", 1) or 1
    if devices is None or not _integer(nodes) or batch * devices * nodes >= 2:
        return []
    return [
        f"batch_size={batch} on {devices * nodes} device(s) is a global batch of one image: the contrastive loss then "
        "has a single target, is 0, and nothing trains; use a global batch of at least 2 (in practice 64 or more)"
    ]


EXTRA_CHECKS: tuple[Callable[[DictConfig], list[str]], ...] = (_global_batch,)


def problems(cfg: DictConfig) -> list[str]:
    """One line per value out of range (empty when the config is valid)."""
    found = []
    for key, (valid, meaning) in RULES.items():
        present, value = _value(cfg, key)
        if not present:
            continue
        values = value if isinstance(value, list) else [value]
        bad = [item for item in values if not valid.accepts(item)]
        if bad:
            shown = value if isinstance(value, list) else bad[0]
            each = " (each)" if isinstance(value, list) else ""
            found.append(f"{key}={shown!r} is out of range: {meaning}{each} must be {valid}")
    for check in EXTRA_CHECKS:
        found += check(cfg)
    return found


def check_config(cfg: DictConfig) -> None:
    """Raise a :class:`ConfigError` listing every value of ``cfg`` out of its range (see :data:`RULES`)."""
    found = problems(cfg)
    if found:
        lines = "\n  ".join(found)
        raise ConfigError(f"the config has {len(found)} value(s) out of range:\n  {lines}")
