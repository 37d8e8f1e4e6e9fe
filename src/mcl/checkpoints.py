"""Checkpoint files that are never half-written, never run code when read, and always hold the newest state.

- :class:`AtomicCheckpointIO` is the Trainer's checkpoint writer: each file is written to a temporary file in the
  same folder and renamed over the old one, so a kill while saving leaves the previous file intact. It reads with
  :func:`load_checkpoint`.
- :func:`load_checkpoint` reads with ``torch.load(weights_only=True)``: tensors and plain containers only, so a
  downloaded file cannot run code when loaded; other failures (missing, truncated, not a checkpoint) get a message
  that names the file.
- :class:`LastCheckpoint` keeps ``last.ckpt`` equal to the state after the newest step: after every training epoch,
  every ``every_n_train_steps`` steps, at the end of training, and at the step where SIGTERM stops it.
- :func:`newest_loadable` picks the checkpoint to resume from when ``last.ckpt`` is unreadable.
- :func:`check_current_layout` refuses a pretraining checkpoint of a layout that mcl 0.2 or earlier wrote before the
  loss and the schedule were config groups of their own (or before ``neck.stage``), naming the version and what to
  update.
- :func:`checkpoint_kind` tells which program wrote a checkpoint (pretraining, linear probe, detector, export), and
  :func:`check_checkpoint_kind` refuses a file of the wrong kind with what to pass instead.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mcl.runs import replaced_atomically

log = logging.getLogger(__name__)
LAST = "last.ckpt"


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint of this library."""


class CheckpointKindError(CheckpointError):
    """A checkpoint of another kind than the one asked for (e.g. a linear probe where a pretraining checkpoint is
    needed), or weights a format cannot hold."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint read with ``weights_only=True``, or a :class:`CheckpointError` that names the file and the cause."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error):  # an object that names a Python callable: what a code-carrying pickle needs
            raise CheckpointError(
                f"{path} holds Python objects beyond tensors and plain containers, and such a file can run code when "
                "it is loaded, so it is refused. Checkpoints and exports written by this library never do; if you "
                "trust the file's origin, load it yourself with torch.load(..., weights_only=False) and re-save its "
                "state_dict."
            ) from error
        if path.suffix == ".pkl":
            raise CheckpointError(
                f"{path} is a pickle, not a PyTorch checkpoint: mcl-export's detectron2 and detectron2_c4 formats "
                "write these for detectron2, and this library does not read them back; pass the pretraining "
                "checkpoint it was exported from, or export another format (see mcl-export --help)"
            ) from error
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({error})") from error
    except Exception as error:  # anything else a foreign or cut file makes the unpickler raise
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or not a PyTorch file): {error}"
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over ``path``."""
    with replaced_atomically(path) as temporary:
        torch.save(obj, temporary)
    return Path(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with rename-into-place writes and ``weights_only`` reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location if map_location is not None else "cpu")


class LastCheckpoint(pl.Callback):
    """Keeps ``<dirpath>/last.ckpt`` at the newest training state (what resume, export and requeued jobs read).

    Written after every training epoch (after its validation), every ``every_n_train_steps`` optimiser steps when
    set (long epochs), when training ends, and when Lightning stops training for SIGTERM (its ``SIGTERMException``,
    raised between two steps on every rank at once: the state is whole), never twice for the same step.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None):
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps={every_n_train_steps} is invalid: use a positive int or null")
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.saved_step: int | None = None

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def save(self, trainer: pl.Trainer) -> None:
        if trainer.sanity_checking or trainer.global_step == self.saved_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole state (and no notice that says so)
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        every = self.every_n_train_steps
        if every and trainer.global_step % every == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or not trainer.training:
            return  # an error, or a signal during validation: no new training state to keep
        self.save(trainer)
        if trainer.is_global_zero:
            log.warning("interrupted: saved the state after step %d to %s", trainer.global_step, self.path)


def newest_loadable(dirpath: str | Path, preferred: str | Path | None = None) -> Path | None:
    """``preferred`` (default ``last.ckpt``) if it loads, else the newest ``*.ckpt`` in ``dirpath`` that loads, with a
    warning naming both; ``None`` when none does."""
    dirpath = Path(dirpath)
    preferred = Path(preferred) if preferred is not None else dirpath / LAST
    candidates = [preferred] + sorted(
        (p for p in dirpath.glob("*.ckpt") if p != preferred), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            load_checkpoint(candidate)
        except CheckpointError as error:
            log.warning("cannot resume from %s: %s", candidate, error)
            continue
        if candidate != preferred:
            log.warning("%s cannot be read; resuming from %s, the newest checkpoint that loads", preferred, candidate)
        return candidate
    return None


# The hyper-parameter layouts of checkpoints that mcl 0.2 or earlier wrote before three changes, which this version
# does not read: the method's own loss settings and loss name (before the `loss` config group), its schedule
# settings (before the `scheduler` config group) and an `interp` neck without `stage` (before neck.stage).
RETIRED_WRITER = "mcl 0.2 or earlier"
RETIRED_LOSS_KEYS = ("level_weights", "temperature", "target_assignment", "label_smoothing")
RETIRED_SCHEDULE_KEYS = ("warmup_epochs", "min_lr", "schedule_shape", "warmup_ratio")


class RetiredCheckpointError(CheckpointError):
    """A pretraining checkpoint in a layout that an earlier version of this library wrote and this one does not
    read."""


def retired_layouts(hparams: Mapping[str, Any]) -> list[str]:
    """What in a pretraining checkpoint's hyper-parameters is of a retired layout, each with how to update it."""
    found = []
    loss_keys = [key for key in RETIRED_LOSS_KEYS if key in hparams]
    if loss_keys or ("loss" in hparams and not isinstance(hparams["loss"], Mapping)):
        found.append(
            f"the loss settings are among the method's hyper-parameters (loss={hparams.get('loss')!r}, {loss_keys}; "
            "before the loss config group): replace them by hyper_parameters['loss'], the loss's config, e.g. "
            "{'_target_': 'mcl.loss.MultiLevelInfoNCE', 'levels': 3, 'temperature': 1.0, 'target_assignment': 'top'} "
            "(mcl.loss.MultiLevelBYOL for loss 'byol', without temperature; mcl.loss.MultiLevelCrossEntropy with "
            "label_smoothing for the supervised method)"
        )
    schedule_keys = [key for key in RETIRED_SCHEDULE_KEYS if key in hparams]
    if schedule_keys:
        found.append(
            f"it holds the schedule settings {schedule_keys} (before the scheduler config group): delete them, and "
            "give scheduler=... to train on"
        )
    neck = hparams.get("neck")
    if isinstance(neck, Mapping) and neck.get("name") == "interp" and "stage" not in neck:
        found.append("its interp neck has no stage (before neck.stage): add 'stage': 5, the stage it was trained with")
    return found


def check_current_layout(hparams: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a pretraining checkpoint whose hyper-parameters are of a layout this version does not read, naming the
    version that wrote it and how to update the file."""
    found = retired_layouts(hparams)
    if found:
        raise RetiredCheckpointError(
            f"{path} was written by {RETIRED_WRITER} in a layout this version does not read: "
            + "; ".join(found)
            + ". Update its hyper_parameters with torch.load(path, weights_only=True) and torch.save, or start a new "
            "run."
        )


# What checkpoint_kind returns, and how messages name each kind (the program that writes it).
CHECKPOINT_KINDS = {
    "pretraining": "a pretraining checkpoint (written by mcl-train)",
    "linear probe": "a linear probe checkpoint (written by mcl-linear)",
    "detector": "a detector checkpoint (written by mcl-finetune)",
    "segmenter": "a segmenter checkpoint (written by mcl-finetune task=semantic)",
    "export": "a bare weight file (a state dict without training state, as mcl-export writes)",
    "unknown": "not a checkpoint of this library",
}
# The weights of the backbone in a pretraining or linear probe checkpoint (mcl.backbones.Backbone.model).
BACKBONE_WEIGHTS = "backbone.model."
# What each entry point's checkpoint input takes ("mcl-finetune" is its ckpt_path, the resume of fine-tuning).
CHECKPOINT_INPUTS = {
    "mcl-train": "mcl-train ckpt_path=... resumes pretraining from its own checkpoints (checkpoints/last.ckpt of a "
    "pretraining run)",
    "mcl-linear": "mcl-linear checkpoint=... trains a linear probe on the backbone of a pretraining checkpoint "
    "(checkpoints/last.ckpt or the best checkpoint of an mcl-train run)",
    "mcl-finetune": "mcl-finetune ckpt_path=... resumes fine-tuning from its own checkpoints (checkpoints/last.ckpt of "
    "an mcl-finetune run)",
    "mcl-finetune model.pretrained": "mcl-finetune model.pretrained=... starts a detector from a pretraining "
    "checkpoint (checkpoints/last.ckpt of an mcl-train run) or from mcl-export's fasterrcnn_v2, retinanet_v2 or "
    "fasterrcnn_c4 file",
    "mcl-finetune task=semantic": "mcl-finetune task=semantic ckpt_path=... resumes segmentation fine-tuning from "
    "its own checkpoints (checkpoints/last.ckpt of an mcl-finetune task=semantic run)",
    "mcl-finetune task=semantic model.pretrained": "mcl-finetune task=semantic model.pretrained=... starts a "
    "segmenter from a pretraining checkpoint (checkpoints/last.ckpt of an mcl-train run) or from mcl-export's "
    "fasterrcnn_v2 or torchvision file",
    "mcl-export": "mcl-export exports a pretraining checkpoint (checkpoints/last.ckpt or the best checkpoint of an "
    "mcl-train run)",
}


def checkpoint_kind(checkpoint: Mapping[str, Any]) -> str:
    """Which program wrote a checkpoint dictionary, from its keys alone (it may be read with ``map_location="meta"``):

    - ``"pretraining"``: ``mcl-train`` (a Lightning checkpoint of :class:`mcl.methods.MCL` or
      :class:`mcl.methods.SupervisedMultiLevel`): ``backbone.model.*`` weights beside others (the pyramid, the tile
      head; plain supervised pretraining has only a classifier on pooled C5) and the method's ``hyper_parameters``
      (their ``backbone``).
    - ``"linear probe"``: ``mcl-linear`` (:class:`mcl.linear.LinearProbe`): ``backbone.model.*`` and ``classifier.*``
      weights and nothing else (no saved hyper-parameters either).
    - ``"detector"``: ``mcl-finetune`` (:class:`mcl.detection.finetune.DetectionModule`): ``detector.*`` weights.
    - ``"segmenter"``: ``mcl-finetune task=semantic`` (:class:`mcl.segmentation.finetune.SegmentationModule`):
      ``segmenter.*`` weights.
    - ``"export"``: a bare state dict (tensor values, no ``state_dict`` key), as ``mcl-export`` writes for its
      torchvision, timm and torchvision detector formats, or its detectron2 dictionary (``model`` and
      ``__author__: "mcl"``). Another library's state dict has the same form.
    - ``"unknown"``: anything else.
    """
    state = checkpoint.get("state_dict")
    if isinstance(state, Mapping):
        keys = [str(key) for key in state]
        if keys and all(key.startswith("detector.") for key in keys):
            return "detector"
        if keys and all(key.startswith("segmenter.") for key in keys):
            return "segmenter"
        if any(key.startswith(BACKBONE_WEIGHTS) for key in keys):
            # Plain supervised pretraining (a classifier on pooled C5) has a linear probe's keys: its saved
            # hyper-parameters tell them apart.
            hparams = checkpoint.get("hyper_parameters")
            if isinstance(hparams, Mapping) and "backbone" in hparams:
                return "pretraining"
            classifier = [key for key in keys if key.startswith("classifier.")]
            if classifier and all(key.startswith((BACKBONE_WEIGHTS, "classifier.")) for key in keys):
                return "linear probe"
        return "unknown"
    if checkpoint.get("__author__") == "mcl" and isinstance(checkpoint.get("model"), Mapping):
        return "export"
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return "export"
    return "unknown"


def check_checkpoint_kind(
    checkpoint: Mapping[str, Any], path: str | Path, expected: str | Sequence[str], entry_point: str
) -> str:
    """Return the :func:`checkpoint_kind` of ``checkpoint`` (read from ``path``) when it is ``expected`` (one kind or
    several); otherwise raise :class:`CheckpointKindError` saying what the file is, what ``entry_point`` takes (a
    key of :data:`CHECKPOINT_INPUTS`, e.g. ``"mcl-train"``) and what the file can be used for instead.

    Example: ``check_checkpoint_kind(load_checkpoint(path, map_location="meta"), path, "pretraining", "mcl-train")``.
    """
    wanted = (expected,) if isinstance(expected, str) else tuple(expected)
    unknown = [kind for kind in wanted if kind not in CHECKPOINT_KINDS]
    if unknown:
        raise ValueError(f"expected={unknown} names no checkpoint kind: use some of {list(CHECKPOINT_KINDS)}")
    kind = checkpoint_kind(checkpoint)
    if kind in wanted:
        return kind
    found = CHECKPOINT_KINDS[kind]
    if kind == "unknown":
        keys = ", ".join(map(str, list(checkpoint)[:8])) or "none"
        found += f" (its top-level keys: {keys})"
    needed = " or ".join(CHECKPOINT_KINDS[name].split(" (")[0] for name in wanted)
    usage = CHECKPOINT_INPUTS.get(entry_point, f"{entry_point} takes {needed}")
    raise CheckpointKindError(f"{path} is {found}, not {needed}: {usage}; {_other_uses(kind, path)}")


def _other_uses(kind: str, path: str | Path) -> str:
    """What a checkpoint of ``kind`` at ``path`` is for, for :func:`check_checkpoint_kind`'s messages."""
    return {
        "pretraining": f"to resume its pretraining use mcl-train ckpt_path={path}, to evaluate its backbone "
        f"mcl-linear checkpoint={path}, to fine-tune a detector from it mcl-finetune model.pretrained={path}",
        "linear probe": "a linear probe holds a frozen backbone and a classifier: to fine-tune or evaluate, pass the "
        "pretraining checkpoint it was trained from (the checkpoint=... in its run's .hydra/config.yaml)",
        "detector": f"to resume its fine-tuning use mcl-finetune ckpt_path={path} with the settings of its run; to "
        "start a detector from pretrained weights, pass the pretraining checkpoint as model.pretrained",
        "segmenter": f"to resume its fine-tuning use mcl-finetune task=semantic ckpt_path={path} with the settings of "
        "its run; to start a segmenter from pretrained weights, pass the pretraining checkpoint as model.pretrained",
        "export": "a bare weight file has no training state or settings to resume from: pass the pretraining "
        "checkpoint it was exported from (mcl-finetune model.pretrained also takes mcl-export's detector formats)",
        "unknown": "pass a checkpoint written by mcl-train, mcl-linear or mcl-finetune (checkpoints/*.ckpt of a run)",
    }[kind]
