"""torchvision detectors in their ``*_resnet50_fpn_v2`` layout, for ResNet-18 and ResNet-50, loadable from MCL weights.

The v2 layout is what pretraining produces: a BatchNorm FPN and, for Faster/Mask R-CNN, a box head of four 3x3
conv + BN layers before its fc (the shapes of MCL's tile head). RetinaNet v2 has a plain FPN (MCL's BN is folded
into it on export) and no place for the tile head.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator

# torchvision's own v2 builders assemble the FPN backbone with this helper; it is the only way to get its BN FPN.
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, RPNHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

ARCHITECTURES = ("fasterrcnn_v2", "maskrcnn_v2", "retinanet_v2")
DEPTHS = {"resnet18": (torchvision.models.resnet18, 512), "resnet50": (torchvision.models.resnet50, 2048)}
# Which export format each detector loads (see mcl.export).
EXPORT_FORMAT = {"fasterrcnn_v2": "fasterrcnn_v2", "maskrcnn_v2": "fasterrcnn_v2", "retinanet_v2": "retinanet_v2"}


def anchor_generator(base_size: int, octaves: int) -> AnchorGenerator:
    """One anchor size per pyramid level (``octaves`` per level for RetinaNet), starting at ``base_size`` on P2/P3."""
    sizes = tuple(
        tuple(int(base_size * 2**level * 2 ** (octave / octaves)) for octave in range(octaves)) for level in range(5)
    )
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)


def build_detector(
    arch: str = "fasterrcnn_v2",
    backbone: str = "resnet50",
    num_classes: int = 91,
    min_size: int = 800,
    max_size: int = 1333,
    anchor_base_size: int = 32,
    proposals_train: int = 2000,
    proposals_test: int = 1000,
    rois_per_image: int = 512,
) -> nn.Module:
    """A randomly initialised detector; ``num_classes`` counts the background for the R-CNNs, as torchvision does.

    ``proposals_train``/``proposals_test`` (RPN proposals kept per image) and ``rois_per_image`` (RoIs sampled per
    image for the box head) default to torchvision's COCO values; the 4-conv box head runs on every RoI, so small
    images with few objects train several times faster with fewer.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is invalid: use one of {ARCHITECTURES}")
    if backbone not in DEPTHS:
        raise ValueError(f"backbone={backbone!r} is invalid for detection: use one of {tuple(DEPTHS)}")
    make_resnet, c5_channels = DEPTHS[backbone]
    sizes = {"min_size": min_size, "max_size": max_size}
    if arch == "retinanet_v2":
        body = _resnet_fpn_extractor(
            make_resnet(), 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(c5_channels, 256)
        )
        anchors = anchor_generator(anchor_base_size, octaves=3)
        head = RetinaNetHead(
            256, anchors.num_anchors_per_location()[0], num_classes, norm_layer=partial(nn.GroupNorm, 32)
        )
        head.regression_head._loss_type = "giou"
        return RetinaNet(body, num_classes, anchor_generator=anchors, head=head, **sizes)
    body = _resnet_fpn_extractor(make_resnet(), 5, norm_layer=nn.BatchNorm2d)
    anchors = anchor_generator(anchor_base_size, octaves=1)
    detector = MaskRCNN if arch == "maskrcnn_v2" else FasterRCNN
    return detector(
        body,
        num_classes=num_classes,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(256, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_head=FastRCNNConvFCHead((256, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d),
        rpn_post_nms_top_n_train=proposals_train,
        rpn_post_nms_top_n_test=proposals_test,
        box_batch_size_per_image=rois_per_image,
        **sizes,
    )


def load_pretrained(detector: nn.Module, arch: str, weights: str | Path) -> list[str]:
    """Load an ``mcl-train`` checkpoint (converted here) or an ``mcl-export`` file; return the missing keys.

    Unexpected keys are an error: they mean the weights were made for another architecture.
    """
    from mcl.checkpoints import load_checkpoint
    from mcl.export import EXPORTERS, load_pretraining_checkpoint

    path = Path(weights)
    state = load_checkpoint(path)
    if "state_dict" in state:
        state = EXPORTERS[EXPORT_FORMAT[arch]](*load_pretraining_checkpoint(path))
    try:
        result = detector.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches: another backbone depth or width
        mismatches = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        raise ValueError(
            f"{path} does not fit {arch}: {len(mismatches)} tensors have other shapes, e.g. {mismatches[:2]}; "
            "pretrain (or export) with the backbone the detector uses (model.backbone)"
        ) from error
    if result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit {arch}: unexpected keys {result.unexpected_keys[:5]}...; "
            f"export it with --format {EXPORT_FORMAT[arch]} from a checkpoint with the same backbone"
        )
    return list(result.missing_keys)
