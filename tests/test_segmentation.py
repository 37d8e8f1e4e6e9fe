"""Semantic segmentation transfer (``mcl-finetune task=semantic``): per-pixel labels from the canvases' instance
masks, the semantic-FPN and DeepLabV3 segmenters, weights from MCL and supervised checkpoints and exports, the IoU
metrics against a hand count, and short fine-tunings from MCL, supervised and random-init weights."""

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from mcl.checkpoints import CheckpointKindError
from mcl.detection.coco import AnnotationFileError, CocoDetection
from mcl.detection.fashion_canvas import CanvasSpec, build_fashion_canvas
from mcl.export import export
from mcl.finetune import finetune
from mcl.methods import MCL
from mcl.runtime import CONFIG_DIR
from mcl.segmentation.data import SemanticCoco
from mcl.segmentation.finetune import SegmentationModule, metric_name
from mcl.segmentation.models import SemanticFPNHead, build_segmenter
from mcl.segmentation.pretrained import load_pretrained

from .conftest import save_checkpoint, small_supervised, small_trunk

WIDTH = 32  # the small pyramid's channels (GroupNorm(32) in the head needs a multiple of 32)


@pytest.fixture(scope="module")
def canvas(tmp_path_factory):
    root = tmp_path_factory.mktemp("canvas")
    build_fashion_canvas(root, num_train=4, num_val=2, seed=0, spec=CanvasSpec(canvas_size=64, max_side=48))
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    mcl = MCL(**small_trunk(4, neck={"name": "fpn", "out_channels": WIDTH}))
    supervised = small_supervised(levels=1, classifier_input="pooled_c5")
    return {
        "mcl": (mcl, save_checkpoint(mcl, folder / "mcl.ckpt")),
        "supervised": (supervised, save_checkpoint(supervised, folder / "supervised.ckpt")),
    }


def test_labels_are_the_visible_masks_categories_and_background_elsewhere(canvas):
    semantic = SemanticCoco(canvas / "train", canvas / "annotations" / "train.json")
    instances = CocoDetection(canvas / "train", canvas / "annotations" / "train.json", masks=True)
    for index in range(len(semantic)):
        image, labels = semantic[index]
        _, target = instances[index]
        expected = torch.zeros(64, 64, dtype=torch.int64)
        for mask, label in zip(target["masks"], target["labels"], strict=True):
            expected[mask.bool()] = label
        assert image.shape == (3, 64, 64) and labels.dtype == torch.int64
        assert torch.equal(labels, expected)
        assert set(labels.unique().tolist()) == {0, *target["labels"].tolist()}
        # the canvases' masks are visible parts: none overlaps another
        assert int(target["masks"].sum(0).max()) <= 1


def test_annotations_without_masks_or_with_a_reserved_category_are_refused(canvas, tmp_path):
    data = json.loads((canvas / "annotations" / "train.json").read_text())
    del data["annotations"][0]["segmentation"]
    (tmp_path / "no_masks.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationFileError, match=r"1 annotation\(s\) have no 'segmentation' \(ids \[1\]\)"):
        SemanticCoco(canvas / "train", tmp_path / "no_masks.json")
    data = json.loads((canvas / "annotations" / "train.json").read_text())
    data["categories"][0]["id"] = 255
    (tmp_path / "reserved.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationFileError, match="category ids 0 .the background. and 255 .ignored pixels."):
        SemanticCoco(canvas / "train", tmp_path / "reserved.json")


def test_the_semantic_fpn_head_fuses_every_map_at_stride_4():
    head = SemanticFPNHead(WIDTH, 32, 5)
    maps = {str(i): torch.randn(2, WIDTH, 16 // 2**i, 16 // 2**i) for i in range(4)}  # P2..P5 of a 64 px image
    assert head(maps).shape == (2, 5, 16, 16)
    assert [sum(isinstance(m, torch.nn.Upsample) for m in h) for h in head.scale_heads] == [0, 1, 2, 3]
    segmenter = build_segmenter("semantic_fpn", "resnet18", 5, fpn_channels=WIDTH, head_channels=32)
    assert segmenter(torch.rand(2, 3, 64, 96)).shape == (2, 5, 64, 96)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "unet"}, "arch='unet' is invalid for task=semantic"),
        ({"arch": "deeplabv3", "backbone": "resnet18"}, "arch=deeplabv3 needs backbone=resnet50"),
        ({"num_classes": 1}, "num_classes=1 is invalid"),
        ({"head_channels": 48}, "head_channels=48 is invalid: GroupNorm"),
        ({"frozen_stages": 6}, "frozen_stages=6 is invalid"),
    ],
)
def test_segmenter_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_segmenter(**{"arch": "semantic_fpn", "backbone": "resnet18", "num_classes": 5, **kwargs})


def test_mcl_weights_fill_the_resnet_and_the_fpn_and_leave_the_head(checkpoints):
    model, checkpoint = checkpoints["mcl"]
    segmenter = build_segmenter("semantic_fpn", "resnet18", 11, fpn_channels=WIDTH, head_channels=32)
    missing = load_pretrained(segmenter, "semantic_fpn", checkpoint)
    assert missing and all(key.startswith("head.") for key in missing)
    assert torch.equal(segmenter.backbone.body.layer3[1].conv2.weight, model.backbone.model.layer3[1].conv2.weight)
    # pretraining's P2 block (the finest of 4 levels) is the segmenter's first FPN block
    assert torch.equal(segmenter.backbone.fpn.layer_blocks[0][0].weight, model.neck.layer_blocks[0][0].weight)


def test_supervised_weights_and_a_torchvision_export_fill_the_resnet_only(checkpoints, tmp_path):
    supervised, checkpoint = checkpoints["supervised"]
    segmenter = build_segmenter("semantic_fpn", "resnet18", 11, fpn_channels=WIDTH, head_channels=32)
    missing = load_pretrained(segmenter, "semantic_fpn", checkpoint)
    assert missing and all(key.startswith(("head.", "backbone.fpn.")) for key in missing)
    assert torch.equal(segmenter.backbone.body.conv1.weight, supervised.backbone.model.conv1.weight)
    exported = export(checkpoints["mcl"][1], "torchvision", tmp_path / "resnet.pt")
    again = build_segmenter("semantic_fpn", "resnet18", 11, fpn_channels=WIDTH, head_channels=32)
    assert all(key.startswith(("head.", "backbone.fpn.")) for key in load_pretrained(again, "semantic_fpn", exported))


def test_deeplabv3_takes_the_resnet_of_a_resnet50_pretraining(tmp_path):
    model = MCL(**small_trunk(2, backbone={"name": "resnet50"}))
    checkpoint = save_checkpoint(model, tmp_path / "r50.ckpt")
    segmenter = build_segmenter("deeplabv3", "resnet50", 11)
    missing = load_pretrained(segmenter, "deeplabv3", checkpoint)
    assert missing and all(key.startswith("head.") for key in missing)
    assert torch.equal(segmenter.backbone.layer4[2].conv3.weight, model.backbone.model.layer4[2].conv3.weight)
    layer4 = segmenter.backbone.layer4  # C5 dilated, not strided: output stride 8
    assert layer4[0].conv2.stride == (1, 1) and layer4[1].conv2.dilation == (4, 4)


def test_weights_of_another_width_or_kind_are_refused_with_the_file(checkpoints, tmp_path):
    _, checkpoint = checkpoints["mcl"]
    wide = build_segmenter("semantic_fpn", "resnet18", 11, fpn_channels=64, head_channels=32)
    with pytest.raises(ValueError, match=r"does not fit semantic_fpn: \d+ tensors have other shapes"):
        load_pretrained(wide, "semantic_fpn", checkpoint)
    torch.save({"state_dict": {"segmenter.head.predictor.weight": torch.zeros(1)}}, tmp_path / "seg.ckpt")
    with pytest.raises(CheckpointKindError, match="is a segmenter checkpoint .* not a pretraining checkpoint"):
        load_pretrained(wide, "semantic_fpn", tmp_path / "seg.ckpt")


class Fixed(torch.nn.Module):
    """A segmenter that predicts the given label maps."""

    def __init__(self, predictions, classes):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(predictions, classes).permute(0, 3, 1, 2).float()

    def forward(self, images):
        return self.logits


def test_miou_pixel_accuracy_and_per_class_iou_against_a_hand_count():
    labels = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 255]]])
    predictions = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 3]]])
    names = {0: "background", 1: "T-shirt/top", 2: "Ankle boot", 3: "Bag", 4: "Coat"}
    module = SegmentationModule(Fixed(predictions, 5), torch.optim.SGD, [], 0, names)
    module.log = lambda *args, **kwargs: None
    module.validation_step((torch.zeros(1, 3, 2, 4), labels), 0)
    module.on_validation_epoch_end()
    # background: 2 right, 1 predicted over class 1, 1 over class 2 -> 2 / 4; class 1: 2 / 3; class 2: 1 / 2;
    # class 3: only predicted on an ignored pixel -> absent; class 4: nowhere -> absent
    evaluation = module.last_evaluation
    assert evaluation["IoU"] == {
        "background": pytest.approx(50.0), "T_shirt_top": pytest.approx(200 / 3), "Ankle_boot": pytest.approx(50.0),
        "Bag": None, "Coat": None,
    }  # fmt: skip
    assert evaluation["mIoU"] == pytest.approx((50 + 200 / 3 + 50) / 3)
    assert evaluation["pixel_accuracy"] == pytest.approx(100 * 5 / 7)
    assert metric_name("T-shirt/top") == "T_shirt_top"


def test_a_few_steps_fit_a_batch():
    torch.manual_seed(0)
    segmenter = build_segmenter("semantic_fpn", "resnet18", 3, fpn_channels=WIDTH, head_channels=32)
    blocks = torch.randint(0, 3, (2, 4, 4))  # 8x8-pixel blocks of 3 classes, each class its own colour
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    images = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    module = SegmentationModule(segmenter, torch.optim.SGD, [], 0, {0: "a", 1: "b", 2: "c"})
    module.log = lambda *args, **kwargs: None
    optimizer = torch.optim.Adam(segmenter.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = module.training_step((images, labels), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def semantic_cfg(canvas, tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "finetune",
            [
                "task=semantic", f"data.root={canvas}", "data.batch_size=2", "data.num_workers=0", "logger=none",
                "detection_schedule.max_epochs=1", "detection_schedule.warmup_steps=1",
                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                f"model.fpn_channels={WIDTH}", "model.head_channels=32", *overrides,
            ],
        )  # fmt: skip
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["mcl", "supervised", None])
def test_a_short_semantic_finetune_reports_iou_metrics(canvas, checkpoints, tmp_path, weights):
    pretrained = f"model.pretrained={checkpoints[weights][1]}" if weights else "model.pretrained=null"
    metrics = finetune(semantic_cfg(canvas, tmp_path, pretrained))
    assert 0.0 <= metrics["val/mIoU"] <= 100.0 and 0.0 <= metrics["val/pixel_accuracy"] <= 100.0
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["mIoU"] == pytest.approx(metrics["val/mIoU"], abs=1e-4)
    assert list(evaluation["IoU"])[:3] == ["background", "T_shirt_top", "Trouser"] and len(evaluation["IoU"]) == 11
    assert metrics["val/IoU/background"] == pytest.approx(evaluation["IoU"]["background"], abs=1e-4)
    assert set(metrics["weights"]) == {"stem", "res2", "res3", "res4", "res5", "fpn", "head"}
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    assert np.all([k.startswith("segmenter.") for k in torch.load(checkpoint, weights_only=True)["state_dict"]])


def test_a_detector_checkpoint_cannot_resume_a_segmentation(canvas, tmp_path):
    torch.save({"state_dict": {"detector.x": torch.zeros(1)}}, tmp_path / "detector.ckpt")
    with pytest.raises(CheckpointKindError, match="is a detector checkpoint .* not a segmenter checkpoint"):
        finetune(semantic_cfg(canvas, tmp_path, f"ckpt_path={tmp_path / 'detector.ckpt'}"))
