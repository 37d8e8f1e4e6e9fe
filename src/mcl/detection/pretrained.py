"""Pretrained weights into a detector of :mod:`mcl.detection.models`: an ``mcl-train`` checkpoint, converted by the
exporter of the detector's format, or an ``mcl-export`` file."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mcl.checkpoints import check_checkpoint_kind, load_checkpoint
from mcl.export import EXPORTERS

# Which export format each detector loads (see mcl.export).
EXPORT_FORMAT = {
    "fasterrcnn_v2": "fasterrcnn_v2",
    "maskrcnn_v2": "fasterrcnn_v2",
    "retinanet_v2": "retinanet_v2",
    "fasterrcnn_c4": "fasterrcnn_c4",
    "maskrcnn_c4": "fasterrcnn_c4",
}


def load_pretrained(detector: nn.Module, arch: str, weights: str | Path) -> list[str]:
    """Load an ``mcl-train`` checkpoint (converted here) or an ``mcl-export`` file; return the missing keys.

    Another kind of checkpoint (a linear probe, a detector: resume those with ``ckpt_path``) is refused with what it
    is. Unexpected keys are an error: they mean the weights were made for another architecture.
    """
    path = Path(weights)
    state = load_checkpoint(path)
    kind = check_checkpoint_kind(state, path, ("pretraining", "export"), "mcl-finetune model.pretrained")
    if kind == "pretraining":
        state = EXPORTERS[EXPORT_FORMAT[arch]](state["state_dict"], state["hyper_parameters"])
    shape_hint = "pretrain (or export) with the backbone the detector uses (model.backbone)"
    keys_hint = f"export it with --format {EXPORT_FORMAT[arch]} from a checkpoint with the same backbone"
    return load_fitting(detector, state, path, arch, shape_hint, keys_hint)


def load_fitting(module: nn.Module, state: dict, path: Path, arch: str, shape_hint: str, keys_hint: str) -> list[str]:
    """Load ``state`` (read from ``path``) into ``module`` non-strictly and return the missing keys; tensors of other
    shapes or keys ``module`` lacks mean the weights were made for another architecture: an error naming the file,
    ``arch`` and what to do (``shape_hint``, ``keys_hint``)."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches: another backbone depth or width
        mismatches = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        raise ValueError(
            f"{path} does not fit {arch}: {len(mismatches)} tensors have other shapes, e.g. {mismatches[:2]}; "
            f"{shape_hint}"
        ) from error
    if result.unexpected_keys:
        raise ValueError(f"{path} does not fit {arch}: unexpected keys {result.unexpected_keys[:5]}...; {keys_hint}")
    return list(result.missing_keys)
