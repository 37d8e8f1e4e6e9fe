"""Export a pretraining checkpoint (MCL or supervised) to the names other libraries load.

``mcl-export CKPT --format FORMAT --output PATH``. The online network is exported: backbone, and where the
format can hold them, the pyramid and the 4 tile-head convs (which have the shapes of a Faster R-CNN box head).
The C4 formats (``fasterrcnn_c4``, ``detectron2_c4``) hold the ResNet alone, res5 under the RoI head's names.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.fusion import fuse_conv_bn_weights

from mcl.checkpoints import (
    BACKBONE_WEIGHTS,
    CheckpointError,
    CheckpointKindError,
    atomic_save,
    check_checkpoint_kind,
    load_checkpoint,
)
from mcl.detection.models import RCNN_FPN_STAGES, RETINANET_FPN_STAGES
from mcl.geometry import neck_geometry
from mcl.runs import replaced_atomically

FORMATS = ("timm", "torchvision", "fasterrcnn_v2", "retinanet_v2", "detectron2", "fasterrcnn_c4", "detectron2_c4")
# Formats written as a detectron2 pickle rather than a torch state dict.
PICKLE_FORMATS = ("detectron2", "detectron2_c4")
BACKBONE_PREFIX = BACKBONE_WEIGHTS  # the backbone's weights in a pretraining checkpoint


def load_pretraining_checkpoint(
    path: str | Path, entry_point: str = "mcl-export"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ``(state_dict, hyper_parameters)`` of an ``mcl`` pretraining checkpoint; another kind of file (a linear
    probe, a detector, an export, a foreign file) is refused with a :class:`CheckpointKindError` that says what it is
    and what ``entry_point`` (see :data:`mcl.checkpoints.CHECKPOINT_INPUTS`) takes instead."""
    path = Path(path)
    checkpoint = load_checkpoint(path)
    check_checkpoint_kind(checkpoint, path, "pretraining", entry_point)
    return checkpoint["state_dict"], checkpoint["hyper_parameters"]


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's weights under timm's names (for ResNets also torchvision's), without a classifier."""
    return _strip(state, BACKBONE_PREFIX)


def _require_resnet(hparams: dict[str, Any], fmt: str) -> None:
    name = hparams["backbone"]["name"]
    if not name.startswith("resnet"):
        raise CheckpointKindError(
            f"format {fmt!r} holds ResNet backbones only, but the checkpoint's backbone is {name!r}; "
            "export it with --format timm"
        )


def _fpn_stages(state: dict[str, torch.Tensor], hparams: dict[str, Any]) -> dict[int, str]:
    """Map pyramid stage (2..5) -> the checkpoint's FPN block index, for the stages pretraining built: an FPN for
    ``L`` levels has one block per map those levels read, finest first (``PartialFPN.stages``)."""
    if hparams["neck"]["name"] != "fpn":
        return {}
    built = {k.split(".")[2] for k in state if k.startswith("neck.inner_blocks.")}
    return {stage: str(index) for index, stage in enumerate(neck_geometry("fpn").stages(len(built)))}


def _conv_norm_name(key: str) -> str:
    """A ``Conv2dNormActivation`` key in detectron2's style: ``0.weight`` -> ``weight``, ``1.bias`` -> ``norm.bias``."""
    part, name = key.split(".", 1)
    return name if part == "0" else f"norm.{name}"


def to_torchvision_fasterrcnn(state: dict[str, torch.Tensor], hparams: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Weights for torchvision's ``fasterrcnn_resnet50_fpn_v2`` / ``maskrcnn_resnet50_fpn_v2`` (and ResNet-18 twins):
    ``backbone.body``, ``backbone.fpn`` (BatchNorm FPN) and the 4 convs of ``roi_heads.box_head``."""
    _require_resnet(hparams, "fasterrcnn_v2")
    out = {f"backbone.body.{k}": v for k, v in backbone_state(state).items()}
    for stage, index in _fpn_stages(state, hparams).items():
        for block in ("inner_blocks", "layer_blocks"):
            for key, value in _strip(state, f"neck.{block}.{index}.").items():
                out[f"backbone.fpn.{block}.{RCNN_FPN_STAGES.index(stage)}.{key}"] = value
    for key, value in _strip(state, "head.convs.").items():
        out[f"roi_heads.box_head.{key}"] = value  # the same Conv2dNormActivation layout
    return out


def to_torchvision_c4(state: dict[str, torch.Tensor], hparams: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Weights for ``mcl.detection.models``' ``fasterrcnn_c4`` / ``maskrcnn_c4``: the stem and ``layer1..3`` as
    ``backbone.body.*`` and ``layer4`` as the RoI head's res5, ``roi_heads.box_head.layer4.*`` (which the C4 mask head
    shares). The neck and the tile head have no place in a C4 detector and are left out."""
    _require_resnet(hparams, "fasterrcnn_c4")
    out = {}
    for key, value in backbone_state(state).items():
        prefix = "roi_heads.box_head." if key.startswith("layer4.") else "backbone.body."
        out[prefix + key] = value
    return out


def _fold_batchnorm(weight: torch.Tensor, norm: dict[str, torch.Tensor], eps: float = 1e-5):
    """A bias-free conv followed by eval-mode BN (``nn.BatchNorm2d``'s default ``eps``), as one conv with a bias."""
    mean, var, scale, shift = (norm[name] for name in ("running_mean", "running_var", "weight", "bias"))
    fused_weight, fused_bias = fuse_conv_bn_weights(weight, None, mean, var, eps, scale, shift)
    return fused_weight.detach(), fused_bias.detach()


def to_torchvision_retinanet(state: dict[str, torch.Tensor], hparams: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Weights for torchvision's ``retinanet_resnet50_fpn_v2``: backbone and the C3..C5 FPN, whose BatchNorm is folded
    into its convs (that FPN has biases and no norm). The tile head is not loaded, as in the appendix."""
    _require_resnet(hparams, "retinanet_v2")
    out = {f"backbone.body.{k}": v for k, v in backbone_state(state).items()}
    for stage, index in _fpn_stages(state, hparams).items():
        if stage not in RETINANET_FPN_STAGES:
            continue
        target = RETINANET_FPN_STAGES.index(stage)
        for block in ("inner_blocks", "layer_blocks"):
            norm = _strip(state, f"neck.{block}.{index}.1.")
            weight, bias = _fold_batchnorm(state[f"neck.{block}.{index}.0.weight"], norm)
            out[f"backbone.fpn.{block}.{target}.0.weight"] = weight
            out[f"backbone.fpn.{block}.{target}.0.bias"] = bias
    return out


_D2_RESNET_RULES: list[tuple[str, str]] = [
    (r"^conv1\.(.*)$", r"stem.conv1.\1"),
    (r"^bn1\.(.*)$", r"stem.conv1.norm.\1"),
    (r"^layer(\d)\.(\d+)\.conv(\d)\.(.*)$", r"res{\1+1}.\2.conv\3.\4"),
    (r"^layer(\d)\.(\d+)\.bn(\d)\.(.*)$", r"res{\1+1}.\2.conv\3.norm.\4"),
    (r"^layer(\d)\.(\d+)\.downsample\.0\.(.*)$", r"res{\1+1}.\2.shortcut.\3"),
    (r"^layer(\d)\.(\d+)\.downsample\.1\.(.*)$", r"res{\1+1}.\2.shortcut.norm.\3"),
]


def detectron2_resnet_name(name: str) -> str:
    """A timm/torchvision ResNet parameter name in detectron2's (``layer1`` -> ``res2``, ``bn1`` -> ``conv1.norm``)."""
    for pattern, replacement in _D2_RESNET_RULES:
        match = re.match(pattern, name)
        if match:
            renamed = match.expand(replacement)
            return re.sub(r"res\{(\d)\+1\}", lambda m: f"res{int(m.group(1)) + 1}", renamed)
    raise KeyError(f"no detectron2 name for backbone parameter {name!r}")


def to_detectron2(state: dict[str, torch.Tensor], hparams: dict[str, Any]) -> dict[str, Any]:
    """A detectron2 checkpoint dict: ``stem``/``res2..res5``, ``fpn_lateral*``/``fpn_output*`` with ``.norm``, and
    ``box_head.conv1..4`` with ``.norm``; numpy values, ``matching_heuristics: True`` so suffixes are matched."""
    _require_resnet(hparams, "detectron2")
    model: dict[str, Any] = {}
    for key, value in backbone_state(state).items():
        model[detectron2_resnet_name(key)] = value
    for stage, index in _fpn_stages(state, hparams).items():
        for block, d2_name in (("inner_blocks", "fpn_lateral"), ("layer_blocks", "fpn_output")):
            for key, value in _strip(state, f"neck.{block}.{index}.").items():
                model[f"{d2_name}{stage}.{_conv_norm_name(key)}"] = value
    for key, value in _strip(state, "head.convs.").items():
        index, rest = key.split(".", 1)
        model[f"box_head.conv{int(index) + 1}.{_conv_norm_name(rest)}"] = value
    model = {k: v for k, v in model.items() if not k.endswith("num_batches_tracked")}
    return {
        "model": {k: v.numpy() for k, v in model.items()},
        "__author__": "mcl",
        "matching_heuristics": True,
    }


def to_detectron2_c4(state: dict[str, torch.Tensor], hparams: dict[str, Any]) -> dict[str, Any]:
    """A detectron2 checkpoint dict for the C4 configs (``Res5ROIHeads``): the stem and res2..res4 under
    ``backbone.``, res5 under ``roi_heads.res5.`` (where those configs keep it), no FPN or box-head convs.

    detectron2 builds its C4 res5 head from bottleneck blocks only, so ResNet-18/34 are refused."""
    _require_resnet(hparams, "detectron2_c4")
    name = hparams["backbone"]["name"]
    if name in ("resnet18", "resnet34"):
        raise CheckpointKindError(
            f"format 'detectron2_c4' needs a bottleneck ResNet (resnet50, resnet101), but the checkpoint's backbone "
            f"is {name!r}: detectron2's C4 RoI head (res5) is made of bottleneck blocks; export it with --format "
            "detectron2 for an FPN config, or fasterrcnn_c4 for mcl-finetune's C4 detectors"
        )
    model: dict[str, Any] = {}
    for key, value in backbone_state(state).items():
        if key.endswith("num_batches_tracked"):
            continue
        d2_name = detectron2_resnet_name(key)
        prefix = "roi_heads." if d2_name.startswith("res5.") else "backbone."
        model[prefix + d2_name] = value.numpy()
    return {"model": model, "__author__": "mcl", "matching_heuristics": True}


EXPORTERS: dict[str, Callable[[dict[str, torch.Tensor], dict[str, Any]], dict[str, Any]]] = {
    "timm": lambda state, hparams: backbone_state(state),
    "torchvision": lambda state, hparams: (_require_resnet(hparams, "torchvision"), backbone_state(state))[1],
    "fasterrcnn_v2": to_torchvision_fasterrcnn,
    "retinanet_v2": to_torchvision_retinanet,
    "detectron2": to_detectron2,
    "fasterrcnn_c4": to_torchvision_c4,
    "detectron2_c4": to_detectron2_c4,
}


def export(checkpoint: str | Path, fmt: str, output: str | Path) -> Path:
    """Write ``checkpoint`` in format ``fmt`` to ``output`` (a ``.pth`` state dict, or a ``.pkl`` for detectron2's)."""
    if fmt not in EXPORTERS:
        raise ValueError(f"--format {fmt!r} is invalid: use one of {FORMATS}")
    state, hparams = load_pretraining_checkpoint(checkpoint)
    weights = EXPORTERS[fmt](state, hparams)
    output = Path(output)
    blocking = next((parent for parent in output.parents if parent.is_file()), None)
    if blocking is not None:
        raise NotADirectoryError(f"--output {output}: {blocking} is a file, not a folder")
    if output.is_dir():
        raise IsADirectoryError(f"--output {output} is a folder; name the file to write")
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt in PICKLE_FORMATS:
        with replaced_atomically(output) as temporary, open(temporary, "wb") as handle:
            pickle.dump(weights, handle)
    else:
        atomic_save(weights, output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mcl-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a pretraining checkpoint of mcl-train (last.ckpt or the best one)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, help="where to write (.pth; .pkl for detectron2, detectron2_c4)")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.format, args.output)
    except (CheckpointError, OSError) as error:
        parser.exit(2, f"mcl-export: error: {error}\n")
    print(f"wrote {args.format} weights to {path}")


if __name__ == "__main__":
    main()
