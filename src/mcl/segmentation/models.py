"""Semantic segmentation networks on the pretrained ResNet, from torchvision parts.

``semantic_fpn``: the ResNet and the BatchNorm FPN over C2..C5 that the FPN detectors use (the pyramid MCL
pretrains at 4 levels; its weights load under the same names), and a semantic-FPN head as in Panoptic FPN: each map
P(k) goes through ``max(1, k - 2)`` blocks of 3x3 conv + GroupNorm + ReLU, each but P2's followed by 2x bilinear
upsampling, so that all four reach stride 4; their sum goes through a 1x1 conv to the classes and is upsampled to
the input.

``deeplabv3``: torchvision's DeepLabV3 head on the ResNet-50 with a dilated C5 (output stride 8), the non-pyramid
family; only the ResNet transfers. ResNet-18's basic blocks cannot dilate, so it is refused there.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.ops import Conv2dNormActivation

from mcl.detection.models import DEPTHS, RCNN_FPN_STAGES, STAGES, fpn_keys, freeze_stages, resnet_fpn

SEGMENTATION_ARCHITECTURES = ("semantic_fpn", "deeplabv3")
# torchvision's ImageNet normalisation, the default as for the detectors.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The stride the semantic-FPN head fuses at (P2's).
FUSED_STRIDE_STAGE = 2


class SemanticFPNHead(nn.Module):
    """Panoptic FPN's semantic branch over maps keyed by :func:`~mcl.detection.models.fpn_keys` of ``stages``."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, stages: tuple[int, ...] = RCNN_FPN_STAGES):
        super().__init__()
        if channels % 32:
            raise ValueError(f"head_channels={channels} is invalid: GroupNorm(32) needs a multiple of 32")
        norm = partial(nn.GroupNorm, 32)
        self.keys = fpn_keys(stages)
        self.scale_heads = nn.ModuleList()
        for stage in stages:
            blocks: list[nn.Module] = []
            for index in range(max(1, stage - FUSED_STRIDE_STAGE)):
                blocks.append(
                    Conv2dNormActivation(in_channels if index == 0 else channels, channels, 3, norm_layer=norm)
                )
                if stage > FUSED_STRIDE_STAGE:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.predictor = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        fused = self.scale_heads[0](maps[self.keys[0]])
        for key, head in zip(self.keys[1:], self.scale_heads[1:], strict=True):
            fused = fused + F.interpolate(head(maps[key]), size=fused.shape[-2:], mode="bilinear", align_corners=False)
        return self.predictor(fused)


class Segmenter(nn.Module):
    """Normalise, ``backbone`` (a dict of maps), ``head`` (logits at some stride), upsample to the input:
    ``(B, 3, H, W)`` in [0, 1] -> ``(B, classes, H, W)`` logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module, image_mean, image_std, head_input: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head_input = head_input  # one map of the backbone's dict (DeepLabV3), or None for all of them
        self.register_buffer("mean", torch.tensor(image_mean or IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std or IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone((images - self.mean) / self.std)
        logits = self.head(maps if self.head_input is None else maps[self.head_input])
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def build_segmenter(
    arch: str = "semantic_fpn",
    backbone: str = "resnet50",
    num_classes: int = 21,
    fpn_channels: int = 256,
    head_channels: int = 128,
    frozen_stages: int = 0,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
) -> Segmenter:
    """A randomly initialised segmenter; ``num_classes`` counts the background (label 0). ``fpn_channels``: the
    pretraining's ``neck.out_channels`` (``semantic_fpn`` only); ``head_channels``: the semantic-FPN head's width;
    ``frozen_stages``: backbone stages kept as loaded, as for the detectors (0 trains all, 5 the whole ResNet)."""
    if arch not in SEGMENTATION_ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is invalid for task=semantic: use one of {SEGMENTATION_ARCHITECTURES}")
    if backbone not in DEPTHS:
        raise ValueError(f"backbone={backbone!r} is invalid for segmentation: use one of {tuple(DEPTHS)}")
    if frozen_stages not in range(len(STAGES) + 1):
        raise ValueError(f"frozen_stages={frozen_stages!r} is invalid: use 0 (train every stage) to {len(STAGES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} is invalid: it counts the background, so it is at least 2")
    make_resnet, c5_channels = DEPTHS[backbone]
    normalisation = {"image_mean": image_mean, "image_std": image_std}
    if arch == "semantic_fpn":
        resnet = freeze_stages(make_resnet(), frozen_stages)
        body = resnet_fpn(resnet, RCNN_FPN_STAGES, fpn_channels, None, norm_layer=nn.BatchNorm2d)
        return Segmenter(body, SemanticFPNHead(fpn_channels, head_channels, num_classes), **normalisation)
    if backbone != "resnet50":
        raise ValueError(
            f"arch=deeplabv3 needs backbone=resnet50: DeepLabV3 dilates C5 (output stride 8), which {backbone}'s "
            "basic blocks cannot; use arch=semantic_fpn"
        )
    resnet = freeze_stages(make_resnet(replace_stride_with_dilation=[False, True, True]), frozen_stages)
    body = IntermediateLayerGetter(resnet, {"layer4": "out"})
    return Segmenter(body, DeepLabHead(c5_channels, num_classes), head_input="out", **normalisation)
