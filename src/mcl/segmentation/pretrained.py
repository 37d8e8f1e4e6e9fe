"""Pretrained weights into a segmenter of :mod:`mcl.segmentation.models`, from an ``mcl-train`` checkpoint or an
``mcl-export`` file in the ``fasterrcnn_v2`` or ``torchvision`` format: the ResNet always, the FPN where the
segmenter has one (``semantic_fpn``). The tile head has no place in a segmenter and is left out."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mcl.checkpoints import check_checkpoint_kind, load_checkpoint
from mcl.detection.pretrained import load_fitting
from mcl.export import EXPORTERS

# Where each segmenter keeps the ResNet, and whether it has the FPN (under backbone.fpn, as the R-CNNs).
RESNET_PREFIX = {"semantic_fpn": "backbone.body.", "deeplabv3": "backbone."}
DETECTOR_RESNET, DETECTOR_FPN = "backbone.body.", "backbone.fpn."


def pyramid_weights(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(ResNet weights under torchvision's names, FPN weights under the R-CNNs' backbone.fpn names)`` of an export
    in the ``fasterrcnn_v2`` layout (keys ``backbone.body.*``, ``backbone.fpn.*``, ``roi_heads.*``) or the
    ``torchvision`` one (plain ResNet keys, no FPN)."""
    if any(key.startswith(DETECTOR_RESNET) for key in state):
        resnet = {k[len(DETECTOR_RESNET) :]: v for k, v in state.items() if k.startswith(DETECTOR_RESNET)}
        return resnet, {k: v for k, v in state.items() if k.startswith(DETECTOR_FPN)}
    return dict(state), {}


def load_pretrained(segmenter: nn.Module, arch: str, weights: str | Path) -> list[str]:
    """Load the ResNet (and the FPN) of a pretraining checkpoint or an export into ``segmenter``; return the keys left
    to their initialisation. Another kind of checkpoint, weights of another depth or width, or keys the segmenter
    does not have are errors that name the file."""
    path = Path(weights)
    state = load_checkpoint(path)
    kind = check_checkpoint_kind(state, path, ("pretraining", "export"), "mcl-finetune task=semantic model.pretrained")
    if kind == "pretraining":
        state = EXPORTERS["fasterrcnn_v2"](state["state_dict"], state["hyper_parameters"])
    resnet, fpn = pyramid_weights(state)
    loaded = {RESNET_PREFIX[arch] + key: value for key, value in resnet.items()}
    if arch == "semantic_fpn":
        loaded.update(fpn)
    shape_hint = "fine-tune with the pretraining's backbone (model.backbone) and neck width (model.fpn_channels)"
    keys_hint = "export it with --format fasterrcnn_v2 or torchvision from a ResNet checkpoint"
    return load_fitting(segmenter, loaded, path, arch, shape_hint, keys_hint)
