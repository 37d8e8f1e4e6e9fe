"""torchvision detectors in their ``*_resnet50_fpn_v2`` layout, for ResNet-18 and ResNet-50, built for MCL weights
(:mod:`mcl.detection.pretrained` loads them).

The v2 layout is what pretraining produces: a BatchNorm FPN and, for Faster/Mask R-CNN, a box head of four 3x3
conv + BN layers before its fc (the shapes of MCL's tile head). RetinaNet v2 has a plain FPN (MCL's BN is folded
into it on export) and no place for the tile head.

The C4 R-CNNs (``fasterrcnn_c4``, ``maskrcnn_c4``; detectron2's R50-C4 layout, assembled from torchvision parts)
have one feature map, C4 (stride 16), and the ResNet's fifth stage as their RoI head: every weight of the ResNet
transfers, the pretraining's neck and tile head do not.
"""

from __future__ import annotations

from functools import partial

import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, RPNHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

ARCHITECTURES = ("fasterrcnn_v2", "maskrcnn_v2", "retinanet_v2", "fasterrcnn_c4", "maskrcnn_c4")
MASK_ARCHITECTURES = ("maskrcnn_v2", "maskrcnn_c4")
# The single-map R-CNNs (detectron2's R50-C4 layout): C4 alone, res5 as the RoI head.
C4_ARCHITECTURES = ("fasterrcnn_c4", "maskrcnn_c4")
DEPTHS = {"resnet18": (torchvision.models.resnet18, 512), "resnet50": (torchvision.models.resnet50, 2048)}
# The C stages the FPN detectors' pyramids read, torchvision's v2 layouts (and detectron2's FPN), whatever stages
# pretraining has: the R-CNNs P2..P5, as pretraining's FPN at 4 levels, and a P6 max-pooled from P5; RetinaNet P3..P5,
# and P6, P7 computed from C5. Their maps are keyed "0", "1", ... finest first (fpn_keys); the exports put
# pretraining's P(k) blocks at P(k)'s index.
RCNN_FPN_STAGES = (2, 3, 4, 5)
RETINANET_FPN_STAGES = (3, 4, 5)
# The C stages torchvision's ResNet stages output: layer1 gives C2 (C5's width / 8), ..., layer4 C5.
RESNET_LAYER_STAGES = (2, 3, 4, 5)
# The maps each adds beyond those stages, which get anchors too: P6 (LastLevelMaxPool); P6 and P7 (LastLevelP6P7).
RCNN_EXTRA_MAPS, RETINANET_EXTRA_MAPS = 1, 2
# The C4 R-CNNs' anchors: detectron2's C4 default of 5 sizes at the one level, base size doubling (32..512 at 32).
C4_ANCHOR_SIZES = 5
# detectron2's POOLER_RESOLUTION for its C4 heads: 14x14 RoIs, which res5 (stride 2) turns into 7x7.
C4_ROI_POOL_SIZE = 14


# The ResNet's stages in detectron2's order (FREEZE_AT counts them): the stem, then res2..res5.
STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def freeze_stages(resnet: nn.Module, count: int) -> nn.Module:
    """Stop gradients into the first ``count`` stages of ``resnet`` (stem, res2, ...); returns ``resnet``."""
    for stage in STAGES[:count]:
        for name in stage:
            getattr(resnet, name).requires_grad_(False)
    return resnet


def fpn_keys(stages: tuple[int, ...]) -> list[str]:
    """The keys of the maps an FPN over the C ``stages`` returns (:func:`resnet_fpn`), finest first: ``"0"``, ..."""
    return [str(index) for index in range(len(stages))]


def resnet_layer(stage: int) -> str:
    """The torchvision ResNet stage that outputs ``C{stage}``: ``layer1`` is C2."""
    return f"layer{RESNET_LAYER_STAGES.index(stage) + 1}"


def anchor_generator(base_size: int, octaves: int, maps: int) -> AnchorGenerator:
    """One anchor size per pyramid map, ``maps`` of them (``octaves`` per map for RetinaNet), starting at
    ``base_size`` on the finest (P2 or P3) and doubling per map."""
    sizes = tuple(
        tuple(int(base_size * 2**level * 2 ** (octave / octaves)) for octave in range(octaves)) for level in range(maps)
    )
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * maps)


def c4_anchor_generator(base_size: int) -> AnchorGenerator:
    """``C4_ANCHOR_SIZES`` sizes from ``base_size`` up, doubling, with ratios 0.5, 1 and 2, all at the one C4 map."""
    return AnchorGenerator((tuple(base_size * 2**k for k in range(C4_ANCHOR_SIZES)),), ((0.5, 1.0, 2.0),))


class ResNetC4(nn.Module):
    """The ResNet up to res4 as a detector backbone: ``(B, 3, H, W)`` -> ``{"0": (B, out_channels, H/16, W/16)}``.

    ``body`` holds the stem and ``layer1..3`` under their torchvision names (``backbone.body.*``, as in the FPN
    detectors); ``out_channels`` is C4's width (1024 for ResNet-50, 256 for ResNet-18).
    """

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.body = IntermediateLayerGetter(resnet, {"layer3": "0"})
        self.out_channels = resnet.layer3[-1].conv1.in_channels

    def forward(self, images):
        return self.body(images)


class Res5BoxHead(nn.Module):
    """The C4 R-CNN box head: the ResNet's ``layer4`` on pooled RoIs, then global average pooling.

    ``(R, C4, 14, 14)`` RoI features -> ``layer4`` (stride 2 in its first block) -> ``(R, C5, 7, 7)`` -> ``(R, C5)``.
    """

    def __init__(self, layer4: nn.Module):
        super().__init__()
        self.layer4 = layer4

    def forward(self, rois):
        return self.layer4(rois).mean(dim=(2, 3))


class SharedRes5MaskHead(nn.Module):
    """The C4 Mask R-CNN mask head: the box head's ``layer4`` itself (the same weights, as detectron2 shares res5),
    without pooling: ``(R, C4, 14, 14)`` -> ``(R, C5, 7, 7)``, which the mask predictor's 2x2 stride-2 transposed conv
    turns into 14x14 masks.

    The stage is held outside the module tree, so its weights are saved and loaded once, under
    ``roi_heads.box_head.layer4``, and moved, frozen and trained with the box head.
    """

    def __init__(self, box_head: Res5BoxHead):
        super().__init__()
        self._box_head = (box_head,)  # a tuple: not registered as a submodule

    def forward(self, rois):
        return self._box_head[0].layer4(rois)


def build_c4_rcnn(
    arch: str,
    resnet: nn.Module,
    c5_channels: int,
    num_classes: int,
    anchor_base_size: int,
    roi_pool_size: int = C4_ROI_POOL_SIZE,
    **options,
) -> nn.Module:
    """Faster or Mask R-CNN on C4: one-level RPN, RoIAlign on C4 (``roi_pool_size``, 14 as detectron2's C4), ``layer4``
    box head (and mask head)."""
    backbone = ResNetC4(resnet)
    anchors = c4_anchor_generator(anchor_base_size)
    box_head = Res5BoxHead(resnet.layer4)
    masks = {}
    if arch == "maskrcnn_c4":
        masks["mask_roi_pool"] = MultiScaleRoIAlign(["0"], roi_pool_size, sampling_ratio=0)
        masks["mask_head"] = SharedRes5MaskHead(box_head)
        masks["mask_predictor"] = MaskRCNNPredictor(c5_channels, 256, num_classes)
    detector = MaskRCNN if arch == "maskrcnn_c4" else FasterRCNN
    return detector(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
        box_roi_pool=MultiScaleRoIAlign(["0"], roi_pool_size, sampling_ratio=0),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(c5_channels, num_classes),
        **masks,
        **options,
    )


def resnet_fpn(
    resnet: nn.Module, stages: tuple[int, ...], width: int, extra_blocks: nn.Module | None, norm_layer
) -> BackboneWithFPN:
    """A torchvision ResNet (every stage trainable) with an FPN of ``width`` channels over the C ``stages``, its maps
    keyed by :func:`fpn_keys`."""
    in_channels = [resnet.inplanes // 8 * 2 ** RESNET_LAYER_STAGES.index(stage) for stage in stages]
    return_layers = dict(zip([resnet_layer(stage) for stage in stages], fpn_keys(stages), strict=True))
    return BackboneWithFPN(resnet, return_layers, in_channels, width, extra_blocks, norm_layer)


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
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
    fpn_channels: int = 256,
    roi_canonical_scale: int = 224,
    roi_canonical_level: int = 4,
    frozen_stages: int = 0,
    roi_pool_size: int | None = None,
) -> nn.Module:
    """A randomly initialised detector; ``num_classes`` counts the background for the R-CNNs, as torchvision does.

    ``proposals_train``/``proposals_test`` (RPN proposals kept per image) and ``rois_per_image`` (RoIs sampled per
    image for the box head) default to torchvision's COCO values; the 4-conv box head runs on every RoI, so small
    images with few objects train several times faster with fewer. ``image_mean``/``image_std`` normalise the input
    (None: torchvision's ImageNet values); fine-tune with the normalisation the weights were pretrained with.
    ``fpn_channels`` is the width of the FPN, RPN and box head (the pretraining's ``neck.out_channels``).
    ``frozen_stages`` counts the backbone stages whose weights stay as loaded, as detectron2's ``FREEZE_AT``: 0 trains
    every stage, 1 freezes the stem, 2 the stem and res2, ... 5 the whole ResNet (a frozen-feature protocol). BatchNorm
    everywhere normalises with batch statistics in training, frozen stages included (their affine weights stay).
    The R-CNNs pool an RoI of side ``s`` from level ``floor(roi_canonical_level + log2(s / roi_canonical_scale))``
    (clamped to P2..P5); torchvision's 224 / 4 suits 800-pixel images and sends every object under 112 pixels to P2.
    ``roi_canonical_scale=<pretraining view size>, roi_canonical_level=5`` pools objects the size of a pretraining
    view from P5, half that size from P4 and so on: where multi-level pretraining put them.

    ``fasterrcnn_c4``/``maskrcnn_c4`` (detectron2's R50-C4) read C4 alone: one-level anchors of 5 sizes from
    ``anchor_base_size`` (32: detectron2's 32..512), 14x14 RoIAlign on C4, ``layer4`` + average pooling as the box
    head (and, unpooled and with the same weights, the mask head). ``fpn_channels`` and ``roi_canonical_*`` do not
    apply to them. Their ``frozen_stages=5`` freezes ``layer4`` too, that is the RoI head's res5: only the RPN,
    the predictors (and the mask predictor) train then. ``roi_pool_size`` (C4 only; None: 14, detectron2's) is the
    side of their RoIAlign output, which res5 halves: res5 runs on every sampled RoI, so its cost goes with the square.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is invalid: use one of {ARCHITECTURES}")
    if backbone not in DEPTHS:
        raise ValueError(f"backbone={backbone!r} is invalid for detection: use one of {tuple(DEPTHS)}")
    if frozen_stages not in range(len(STAGES) + 1):
        raise ValueError(f"frozen_stages={frozen_stages!r} is invalid: use 0 (train every stage) to {len(STAGES)}")
    c4 = arch in C4_ARCHITECTURES
    if roi_pool_size is not None and not c4:
        raise ValueError(
            f"roi_pool_size={roi_pool_size!r} is for the C4 archs; {arch} pools 7x7 (boxes), 14x14 (masks)"
        )
    if roi_pool_size is not None and (
        isinstance(roi_pool_size, bool) or not isinstance(roi_pool_size, int) or roi_pool_size < 2
    ):
        raise ValueError(
            f"roi_pool_size={roi_pool_size!r} is invalid: use an int >= 2 (res5 halves it), or null for 14"
        )
    make_resnet, c5_channels = DEPTHS[backbone]
    resnet = freeze_stages(make_resnet(), frozen_stages)
    sizes = {"min_size": min_size, "max_size": max_size, "image_mean": image_mean, "image_std": image_std}
    if c4:
        return build_c4_rcnn(
            arch,
            resnet,
            c5_channels,
            num_classes,
            anchor_base_size,
            roi_pool_size or C4_ROI_POOL_SIZE,
            rpn_post_nms_top_n_train=proposals_train,
            rpn_post_nms_top_n_test=proposals_test,
            box_batch_size_per_image=rois_per_image,
            **sizes,
        )
    width = fpn_channels
    if arch == "retinanet_v2":
        extra = LastLevelP6P7(c5_channels, width)
        body = resnet_fpn(resnet, RETINANET_FPN_STAGES, width, extra, norm_layer=None)
        anchors = anchor_generator(anchor_base_size, 3, len(RETINANET_FPN_STAGES) + RETINANET_EXTRA_MAPS)
        head = RetinaNetHead(
            width, anchors.num_anchors_per_location()[0], num_classes, norm_layer=partial(nn.GroupNorm, 32)
        )
        head.regression_head._loss_type = "giou"
        return RetinaNet(body, num_classes, anchor_generator=anchors, head=head, **sizes)
    body = resnet_fpn(resnet, RCNN_FPN_STAGES, width, None, norm_layer=nn.BatchNorm2d)
    anchors = anchor_generator(anchor_base_size, 1, len(RCNN_FPN_STAGES) + RCNN_EXTRA_MAPS)
    levels = {"canonical_scale": roi_canonical_scale, "canonical_level": roi_canonical_level}
    pooled_maps = fpn_keys(RCNN_FPN_STAGES)  # RoIs pool from P2..P5, not P6
    masks = {}
    if arch == "maskrcnn_v2":
        masks["mask_roi_pool"] = MultiScaleRoIAlign(pooled_maps, 14, 2, **levels)
    detector = MaskRCNN if arch == "maskrcnn_v2" else FasterRCNN
    return detector(
        body,
        num_classes=num_classes,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(width, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_head=FastRCNNConvFCHead((width, 7, 7), [width] * 4, [1024], norm_layer=nn.BatchNorm2d),
        box_roi_pool=MultiScaleRoIAlign(pooled_maps, 7, 2, **levels),
        rpn_post_nms_top_n_train=proposals_train,
        rpn_post_nms_top_n_test=proposals_test,
        box_batch_size_per_image=rois_per_image,
        **masks,
        **sizes,
    )
