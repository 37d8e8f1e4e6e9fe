"""A multi-level method from its checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from mcl.checkpoints import check_current_layout, load_checkpoint
from mcl.loss import build_loss


def load_method(
    cls: type[pl.LightningModule],
    checkpoint_path: str | Path,
    map_location: Any = "cpu",
    strict: bool = True,
    **overrides: Any,
) -> pl.LightningModule:
    """The ``cls`` model a checkpoint of this library holds, read with ``weights_only=True`` (to ``map_location``,
    where the model then lives), its loss rebuilt from the saved config (:func:`~mcl.loss.build_loss`);
    ``overrides`` replace saved hyper-parameters. A checkpoint of a layout this version does not read is refused
    (:func:`~mcl.checkpoints.check_current_layout`)."""
    checkpoint = load_checkpoint(checkpoint_path, map_location)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    check_current_layout(hparams, checkpoint_path)
    loss = hparams.pop("loss", None)
    model = cls(**{**hparams, "loss": None if loss is None else build_loss(loss), **overrides})
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=strict)
    device = next((t.device for t in checkpoint["state_dict"].values() if isinstance(t, torch.Tensor)), None)
    return model.to(device) if device is not None else model
