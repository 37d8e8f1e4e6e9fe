"""Detection fine-tuning on a tiny canvas set: loading MCL weights, a few steps, COCO evaluation."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from mcl.detection.coco import CocoDetection, horizontal_flip
from mcl.detection.fashion_canvas import CanvasSpec, build_fashion_canvas
from mcl.detection.finetune import finetune, step_schedule
from mcl.detection.models import build_detector
from mcl.detection.pretrained import load_pretrained
from mcl.methods import MCL
from mcl.runtime import CONFIG_DIR

from .conftest import save_checkpoint, small_trunk

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def canvas(tmp_path_factory):
    root = tmp_path_factory.mktemp("canvas")
    build_fashion_canvas(root, num_train=4, num_val=2, seed=0, spec=CanvasSpec(canvas_size=128, max_side=80))
    return root


@pytest.fixture(scope="module")
def r18_checkpoint(tmp_path_factory):
    model = MCL(**small_trunk(4, neck={"name": "fpn", "out_channels": 256}))
    return model, save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "r18.ckpt")


def finetune_cfg(canvas, tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "finetune",
            [
                f"data.root={canvas}", "data.batch_size=2", "data.num_workers=0", "logger=none",
                "detection_schedule.max_epochs=1", "detection_schedule.warmup_steps=1",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false", "model.min_size=128", "model.max_size=128", *overrides,
            ],
        )  # fmt: skip
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    return cfg


@pytest.mark.parametrize("arch", ["fasterrcnn_v2", "maskrcnn_v2", "retinanet_v2"])
def test_detectors_load_mcl_weights_with_only_detector_keys_missing(r18_checkpoint, arch):
    model, checkpoint = r18_checkpoint
    detector = build_detector(arch, "resnet18", num_classes=11)
    missing = load_pretrained(detector, arch, checkpoint)
    assert missing and not any(k.startswith("backbone.body.") for k in missing)
    assert torch.equal(detector.backbone.body.layer2[0].conv1.weight, model.backbone.model.layer2[0].conv1.weight)
    if arch != "retinanet_v2":
        assert not any(k.startswith(("backbone.fpn.", "roi_heads.box_head.0.")) for k in missing)


def test_mismatched_weights_are_refused(r18_checkpoint, tmp_path):
    _, checkpoint = r18_checkpoint
    with pytest.raises(ValueError, match=r"does not fit fasterrcnn_v2: \d+ tensors have other shapes.*size mismatch"):
        load_pretrained(build_detector("fasterrcnn_v2", "resnet50", 11), "fasterrcnn_v2", checkpoint)


@pytest.mark.parametrize("arch", ["fasterrcnn_v2", "maskrcnn_v2", "retinanet_v2"])
def test_a_short_finetune_reports_coco_metrics(canvas, r18_checkpoint, tmp_path, arch):
    _, checkpoint = r18_checkpoint
    metrics = finetune(finetune_cfg(canvas, tmp_path, f"model.arch={arch}", f"model.pretrained={checkpoint}"))
    for key in ("val/AP", "val/AP50", "val/AP75", "val/APs", "val/APm", "val/APl"):
        assert 0.0 <= metrics[key] <= 100.0
    assert list(metrics["ap_by_iou"]) == [f"{0.5 + 0.05 * i:.2f}" for i in range(10)]
    assert ("val/mask_AP" in metrics) == (arch == "maskrcnn_v2")
    assert (tmp_path / "evaluation.json").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_canvas_dataset_targets_and_flip(canvas):
    dataset = CocoDetection(canvas / "train", canvas / "annotations" / "train.json", masks=True)
    image, target = dataset[0]
    assert image.shape == (3, 128, 128) and image.max() <= 1.0
    assert target["masks"].shape[0] == target["boxes"].shape[0] == target["labels"].shape[0]
    flipped, flipped_target = horizontal_flip(image, target)
    assert torch.equal(flipped.flip(-1), image)
    assert torch.allclose(flipped_target["boxes"][:, [0, 2]], 128 - target["boxes"][:, [2, 0]])


def test_step_schedule():
    assert step_schedule(0, 10, [50, 80]) == pytest.approx(0.001)
    assert step_schedule(10, 10, [50, 80]) == pytest.approx(1.0)
    assert step_schedule(60, 10, [50, 80]) == pytest.approx(0.1)
    assert step_schedule(90, 10, [50, 80]) == pytest.approx(0.01)


def copy_canvas(canvas, tmp_path, edit=None, remove_image=False):
    """A copy of the canvas set whose training annotations ``edit`` changed, or one of whose images is missing."""
    import json
    import shutil

    root = tmp_path / "canvas"
    shutil.copytree(canvas, root)
    path = root / "annotations" / "train.json"
    data = json.loads(path.read_text())
    if edit:
        edit(data)
        path.write_text(json.dumps(data))
    if remove_image:
        (root / "train" / data["images"][0]["file_name"]).unlink()
    return root


def zero_width(data):
    data["annotations"][0]["bbox"][2] = 0.0


def test_bad_annotations_are_named_before_training(canvas, tmp_path):
    broken = copy_canvas(canvas, tmp_path / "a")
    (broken / "annotations" / "train.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="train.json is not a COCO annotation file"):
        CocoDetection(broken / "train", broken / "annotations" / "train.json")
    degenerate = copy_canvas(canvas, tmp_path / "b", edit=zero_width)
    annotations = degenerate / "annotations" / "train.json"
    with pytest.raises(ValueError, match=r"1 annotation\(s\) have a box of zero or negative .*ids \[1\]"):
        CocoDetection(degenerate / "train", annotations)
    dataset = CocoDetection(degenerate / "train", annotations, drop_degenerate_boxes=True)
    assert 1 not in dataset.coco.anns and all(box[2:].gt(box[:2]).all() for box in dataset[0][1]["boxes"])
    missing = copy_canvas(canvas, tmp_path / "c", remove_image=True)
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .*train.json are missing"):
        CocoDetection(missing / "train", missing / "annotations" / "train.json")


def test_detector_width_follows_the_pretraining_neck(tmp_path):
    """A 64-channel pyramid (neck.out_channels=64) loads into a detector with fpn_channels=64, head included."""
    model = MCL(**small_trunk(4, neck={"name": "fpn", "out_channels": 64}))
    checkpoint = save_checkpoint(model, tmp_path / "narrow.ckpt")
    detector = build_detector("fasterrcnn_v2", "resnet18", num_classes=11, fpn_channels=64)
    missing = load_pretrained(detector, "fasterrcnn_v2", checkpoint)
    assert not any(k.startswith(("backbone.", "roi_heads.box_head.0.")) for k in missing)
    assert torch.equal(detector.roi_heads.box_head[0][0].weight, model.head.convs[0][0].weight)
    assert detector.backbone.fpn.layer_blocks[0][0].weight.shape == (64, 64, 3, 3)
    normalised = build_detector("fasterrcnn_v2", "resnet18", 11, image_mean=[0.1] * 3, image_std=[0.2] * 3)
    assert normalised.transform.image_mean == [0.1] * 3 and normalised.transform.image_std == [0.2] * 3
    with pytest.raises(ValueError, match="tensors have other shapes"):
        load_pretrained(build_detector("fasterrcnn_v2", "resnet18", 11), "fasterrcnn_v2", checkpoint)


def test_finetune_normalises_with_the_given_mean_and_std_and_reports_weights(canvas, r18_checkpoint, tmp_path):
    _, checkpoint = r18_checkpoint
    cfg = finetune_cfg(
        canvas, tmp_path, f"model.pretrained={checkpoint}", "model.image_mean=[0.286,0.286,0.286]",
        "model.image_std=[0.353,0.353,0.353]", "~callbacks.checkpoint", "~callbacks.last",
    )  # fmt: skip
    metrics = finetune(cfg)
    assert set(metrics["weights"]) >= {"stem", "res2", "res5", "fpn", "rpn", "box_head", "box_predictor"}
    assert all(part["relative_move"] > 0 for part in metrics["weights"].values())
    assert len(metrics["area_ranges"]) == 3 and {"val/APs3", "val/APm3", "val/APl3"} <= set(metrics)


def test_roi_levels_follow_the_canonical_scale_and_level():
    """torchvision's 224 / 4 sends every RoI under 112 px to P2; 32 / 5 sends 32 px to P5, 16 to P4, 8 to P3."""
    boxes = [torch.tensor([[0.0, 0.0, side, side]]) for side in (8.0, 16.0, 32.0, 64.0)]
    features = {str(i): torch.zeros(1, 4, 16 // 2**i, 16 // 2**i) for i in range(4)}  # strides 4..32
    for (scale, level), expected in (((224, 4), [0, 0, 0, 0]), ((32, 5), [1, 2, 3, 3])):
        for arch in ("fasterrcnn_v2", "maskrcnn_v2"):
            levels = {"roi_canonical_scale": scale, "roi_canonical_level": level}
            detector = build_detector(arch, "resnet18", 11, 64, 64, **levels)
            pools = [detector.roi_heads.box_roi_pool] + ([detector.roi_heads.mask_roi_pool] * (arch == "maskrcnn_v2"))
            for pool in pools:
                pool(features, boxes[:1], [(64, 64)])  # the first call sets up the level mapper
                assert [int(pool.map_levels([box])) for box in boxes] == expected


def test_frozen_stages_keep_their_weights_and_still_normalise_with_batch_statistics():
    """frozen_stages=2 (detectron2's FREEZE_AT): one SGD step leaves the stem and res2 as they were, moves res3."""
    torch.manual_seed(0)
    detector = build_detector("fasterrcnn_v2", "resnet18", 3, 64, 64, fpn_channels=32, frozen_stages=2)
    body = detector.backbone.body
    frozen = [body.conv1.weight, body.bn1.weight, body.layer1[0].conv1.weight, body.layer1[1].bn2.bias]
    trained = [
        body.layer2[0].conv1.weight,
        body.layer4[1].conv2.weight,
        detector.backbone.fpn.layer_blocks[0][0].weight,
    ]
    assert not any(p.requires_grad for p in frozen) and all(p.requires_grad for p in trained)
    before = [p.detach().clone() for p in frozen + trained]
    running_mean = body.layer1[0].bn1.running_mean.clone()
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.1)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    detector.train()
    sum(detector([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], targets).values()).backward()
    optimizer.step()
    after = frozen + trained
    assert [torch.equal(b, a) for b, a in zip(before, after, strict=True)] == [True] * 4 + [False] * 3
    assert not torch.equal(body.layer1[0].bn1.running_mean, running_mean)
    with pytest.raises(ValueError, match=r"frozen_stages=6 is invalid: use 0 \(train every stage\) to 5"):
        build_detector("fasterrcnn_v2", "resnet18", 3, frozen_stages=6)


@pytest.fixture(scope="module")
def r18_interp_checkpoint(tmp_path_factory):
    """A ResNet-18 MCL model with the interp neck (the default stage 5), as pretrained for the C4 detectors."""
    model = MCL(**small_trunk(3, neck={"name": "interp", "out_channels": 16}))
    return model, save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "r18_interp.ckpt")


@pytest.mark.parametrize("arch", ["maskrcnn_c4", "fasterrcnn_c4"])
def test_a_short_c4_finetune_reports_boxes_and_masks(canvas, r18_interp_checkpoint, tmp_path, arch):
    """The tiny canvas run of the C4 R-CNNs from interp-pretrained weights: bbox AP for both, segm AP for Mask."""
    _, checkpoint = r18_interp_checkpoint
    overrides = ["model.backbone=resnet18", f"model.pretrained={checkpoint}", "model.proposals_test=50"]
    metrics = finetune(finetune_cfg(canvas, tmp_path, f"model.arch={arch}", *overrides, "~callbacks.checkpoint"))
    for key in ("val/AP", "val/AP50", "val/APs"):
        assert 0.0 <= metrics[key] <= 100.0
    assert ("val/mask_AP" in metrics) == (arch == "maskrcnn_c4")
    evaluation = (tmp_path / "evaluation.json").read_text()
    assert '"bbox"' in evaluation and ('"segm"' in evaluation) == (arch == "maskrcnn_c4")
    assert metrics["weights"]["box_head"]["relative_move"] > 0  # res5, the RoI head, trains


def test_c4_detectors_read_c4_at_stride_16_and_pool_res5_features():
    """R18: C4 has 256 channels at H/16; the box head maps (R, 256, 14, 14) RoIs to (R, 512), the mask head to 7x7."""
    detector = build_detector("maskrcnn_c4", "resnet18", 11, 64, 64).eval()
    assert detector.backbone.out_channels == 256
    with torch.no_grad():
        features = detector.backbone(torch.rand(2, 3, 128, 96))
        rois = torch.rand(3, 256, 14, 14)
        assert list(features) == ["0"] and features["0"].shape == (2, 256, 8, 6)
        assert detector.roi_heads.box_head(rois).shape == (3, 512)
        assert detector.roi_heads.mask_head(rois).shape == (3, 512, 7, 7)
        assert detector.roi_heads.mask_predictor(detector.roi_heads.mask_head(rois)).shape == (3, 11, 14, 14)
    assert detector.roi_heads.box_predictor.cls_score.in_features == 512
    assert detector.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),)  # detectron2's C4 default
    assert detector.rpn.head.cls_logits.out_channels == 15  # 5 sizes x 3 ratios at each C4 position
    assert not any(k.startswith("roi_heads.mask_head.") for k in detector.state_dict())  # res5 is saved once
    r50 = build_detector("fasterrcnn_c4", "resnet50", 11, 64, 64)
    assert r50.backbone.out_channels == 1024 and r50.roi_heads.box_predictor.cls_score.in_features == 2048


def test_c4_roi_pool_size_sets_both_roialigns_and_the_mask_size_and_fpn_archs_refuse_it():
    """``roi_pool_size=7``: 7x7 RoIs, res5 gives 4x4, the mask predictor 8x8 masks; the detector still trains."""
    detector = build_detector("maskrcnn_c4", "resnet18", 3, 64, 64, roi_pool_size=7, rois_per_image=8)
    heads = detector.roi_heads
    assert heads.box_roi_pool.output_size == (7, 7) and heads.mask_roi_pool.output_size == (7, 7)
    with torch.no_grad():
        assert heads.mask_predictor(heads.mask_head(torch.rand(2, 256, 7, 7))).shape == (2, 3, 8, 8)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[:, 8:40, 8:40] = 1
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks}]
    losses = detector.train()([torch.rand(3, 64, 64)], targets)
    assert set(losses) >= {"loss_classifier", "loss_mask"} and all(torch.isfinite(v) for v in losses.values())
    assert build_detector("fasterrcnn_c4", "resnet18", 3).roi_heads.box_roi_pool.output_size == (14, 14)
    with pytest.raises(ValueError, match=r"roi_pool_size=7 is for the C4 archs; fasterrcnn_v2 pools 7x7"):
        build_detector("fasterrcnn_v2", "resnet18", 3, roi_pool_size=7)
    with pytest.raises(ValueError, match=r"roi_pool_size=1 is invalid: use an int >= 2"):
        build_detector("fasterrcnn_c4", "resnet18", 3, roi_pool_size=1)


@pytest.mark.parametrize(("frozen_stages", "res5_trains"), [(4, True), (5, False)])
def test_frozen_stages_on_c4_freeze_the_trunk_and_at_5_the_res5_head(frozen_stages, res5_trains):
    detector = build_detector("maskrcnn_c4", "resnet18", 3, 64, 64, frozen_stages=frozen_stages)
    body, res5 = detector.backbone.body, detector.roi_heads.box_head.layer4
    assert not any(p.requires_grad for p in body.parameters())  # stem..res4
    assert all(p.requires_grad == res5_trains for p in res5.parameters())
    assert all(p.requires_grad for p in detector.roi_heads.mask_predictor.parameters())
    before = res5[0].conv1.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.1)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[:, 8:40, 8:40] = 1
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks}] * 2
    detector.train()
    sum(detector([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], targets).values()).backward()
    optimizer.step()
    assert torch.equal(res5[0].conv1.weight, before) != res5_trains
