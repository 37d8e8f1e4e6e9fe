"""Export round trips: every format loads into its target model with only the undeliverable keys missing."""

import pickle

import pytest
import timm
import torch
import torchvision
from torchvision.models import detection

from mcl.detection.models import build_detector
from mcl.export import CheckpointKindError, detectron2_resnet_name, export, main
from mcl.methods import MCL, SupervisedMultiLevel

from .conftest import save_checkpoint, small_trunk


@pytest.fixture(scope="module")
def r50_checkpoint(tmp_path_factory):
    """A ResNet-50 MCL model with all 4 levels (the full P2..P5 pyramid) and 256 channels, as detectors expect."""
    model = MCL(**small_trunk(4, backbone={"name": "resnet50"}, neck={"name": "fpn", "out_channels": 256}))
    with torch.no_grad():  # non-trivial BN statistics, so that folding and copying are really checked
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
    return model, save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "r50.ckpt")


def load(target, weights):
    result = target.load_state_dict(weights, strict=False)
    return set(result.missing_keys), set(result.unexpected_keys)


@pytest.mark.parametrize("method", ["mcl", "supervised"])
def test_backbone_export_loads_into_timm_and_torchvision(tmp_path, method):
    cls, extra = (MCL, {}) if method == "mcl" else (SupervisedMultiLevel, {"num_classes": 10})
    model = cls(**small_trunk(3, **extra))
    checkpoint = save_checkpoint(model, tmp_path / "model.ckpt")
    for fmt, target in (("timm", timm.create_model("resnet18")), ("torchvision", torchvision.models.resnet18())):
        weights = torch.load(export(checkpoint, fmt, tmp_path / "export" / f"{fmt}.pth"))  # creates the folder
        assert load(target, weights) == ({"fc.weight", "fc.bias"}, set())
        assert torch.equal(target.layer3[1].conv2.weight, model.backbone.model.layer3[1].conv2.weight)


def test_fasterrcnn_v2_export_fills_backbone_fpn_and_box_head_convs(r50_checkpoint, tmp_path):
    model, checkpoint = r50_checkpoint
    weights = torch.load(export(checkpoint, "fasterrcnn_v2", tmp_path / "frcnn.pth"))
    for build in (detection.fasterrcnn_resnet50_fpn_v2, detection.maskrcnn_resnet50_fpn_v2):
        detector = build(weights=None, weights_backbone=None, num_classes=5)
        missing, unexpected = load(detector, weights)
        assert unexpected == set()
        assert all(
            k.startswith(("rpn.", "roi_heads.box_predictor.", "roi_heads.box_head.5.", "roi_heads.mask_"))
            for k in missing
        )
        assert not any(k.startswith(("backbone.", "roi_heads.box_head.0")) for k in missing)
    box_head = detection.fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).roi_heads.box_head
    box_head.load_state_dict(
        {k[len("roi_heads.box_head.") :]: v for k, v in weights.items() if "box_head" in k}, strict=False
    )
    assert torch.equal(box_head[2][0].weight, model.head.convs[2][0].weight)
    assert torch.equal(weights["backbone.fpn.inner_blocks.0.1.running_var"], model.neck.inner_blocks[0][1].running_var)


def test_fasterrcnn_export_of_three_levels_leaves_p2_to_the_detector(tmp_path):
    model = MCL(**small_trunk(3, backbone={"name": "resnet50"}, neck={"name": "fpn", "out_channels": 256}))
    weights = torch.load(export(save_checkpoint(model, tmp_path / "m.ckpt"), "fasterrcnn_v2", tmp_path / "f.pth"))
    missing, _ = load(detection.fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None), weights)
    backbone_missing = {k for k in missing if k.startswith("backbone.")}
    assert backbone_missing and all(".inner_blocks.0." in k or ".layer_blocks.0." in k for k in backbone_missing)
    assert torch.equal(weights["backbone.fpn.layer_blocks.3.0.weight"], model.neck.layer_blocks[2][0].weight)


def test_retinanet_v2_export_folds_the_fpn_batchnorm(r50_checkpoint, tmp_path):
    model, checkpoint = r50_checkpoint
    weights = torch.load(export(checkpoint, "retinanet_v2", tmp_path / "retina.pth"))
    retina = detection.retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=5)
    missing, unexpected = load(retina, weights)
    assert unexpected == set()
    assert all(k.startswith(("head.", "backbone.fpn.extra_blocks.")) for k in missing)
    # C4's lateral conv: torchvision's biased conv equals our conv + BN in eval mode.
    features = torch.randn(2, 1024, 5, 5)
    ours = model.neck.eval().inner_blocks[2](features)
    theirs = retina.backbone.fpn.inner_blocks[1](features)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_detectron2_pickle_uses_detectron2_names(r50_checkpoint, tmp_path):
    model, checkpoint = r50_checkpoint
    with open(export(checkpoint, "detectron2", tmp_path / "d2.pkl"), "rb") as handle:
        exported = pickle.load(handle)
    assert exported["matching_heuristics"] is True
    names = exported["model"]
    for key in (
        "stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.conv1.weight", "res2.0.conv3.norm.bias",
        "res3.0.shortcut.weight", "res5.2.conv2.norm.weight", "fpn_lateral2.weight", "fpn_lateral2.norm.weight",
        "fpn_output5.weight", "fpn_output5.norm.running_mean", "box_head.conv1.weight", "box_head.conv4.norm.bias",
    ):  # fmt: skip
        assert key in names, key
    assert not any(k.endswith("num_batches_tracked") or k.startswith(("layer", "bn1")) for k in names)
    assert sum(k.startswith("res4.") and k.endswith("conv1.weight") for k in names) == 6  # ResNet-50: 6 blocks
    assert (names["box_head.conv3.weight"] == model.head.convs[2][0].weight.detach().numpy()).all()
    assert (names["res3.1.conv2.norm.running_mean"] == model.backbone.model.layer2[1].bn2.running_mean.numpy()).all()


@pytest.fixture(scope="module")
def r50_interp_checkpoint(tmp_path_factory):
    """A ResNet-50 MCL model with the interp neck, as pretrained for the C4 detectors."""
    model = MCL(**small_trunk(3, backbone={"name": "resnet50"}, neck={"name": "interp", "out_channels": 32}))
    return model, save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "r50_interp.ckpt")


@pytest.mark.parametrize("arch", ["maskrcnn_c4", "fasterrcnn_c4"])
def test_fasterrcnn_c4_export_loads_with_only_the_detector_heads_missing(r50_interp_checkpoint, tmp_path, arch):
    model, checkpoint = r50_interp_checkpoint
    weights = torch.load(export(checkpoint, "fasterrcnn_c4", tmp_path / "c4.pth"))
    detector = build_detector(arch, "resnet50", num_classes=5)
    missing, unexpected = load(detector, weights)
    assert unexpected == set()
    heads = ("rpn.", "roi_heads.box_predictor.") + (("roi_heads.mask_predictor.",) if arch == "maskrcnn_c4" else ())
    assert all(k.startswith(heads) for k in missing)
    assert {next(h for h in heads if k.startswith(h)) for k in missing} == set(heads)  # each head, nothing else
    loaded = detector.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())  # every exported tensor landed
    assert len(weights) == len(model.backbone.model.state_dict())  # the whole ResNet, no neck or tile head
    res5 = model.backbone.model.layer4[2].conv3.weight
    assert torch.equal(detector.roi_heads.box_head.layer4[2].conv3.weight, res5)
    if arch == "maskrcnn_c4":  # the mask head is the box head's res5
        assert detector.roi_heads.mask_head._box_head[0] is detector.roi_heads.box_head


def test_detectron2_c4_pickle_puts_res5_in_the_roi_heads(r50_interp_checkpoint, tmp_path):
    model, checkpoint = r50_interp_checkpoint
    with open(export(checkpoint, "detectron2_c4", tmp_path / "d2_c4.pkl"), "rb") as handle:
        exported = pickle.load(handle)
    names = exported["model"]
    for key in (
        "backbone.stem.conv1.weight", "backbone.stem.conv1.norm.running_mean", "backbone.res2.0.shortcut.weight",
        "backbone.res4.5.conv3.norm.running_var", "roi_heads.res5.0.conv1.weight",
        "roi_heads.res5.0.shortcut.norm.bias", "roi_heads.res5.2.conv3.norm.weight",
    ):  # fmt: skip
        assert key in names, key
    assert all(k.startswith(("backbone.stem.", "backbone.res2.", "backbone.res3.", "backbone.res4.")) or
               k.startswith("roi_heads.res5.") for k in names)  # fmt: skip
    assert not any(k.endswith("num_batches_tracked") for k in names)
    assert len(names) == sum(not k.endswith("num_batches_tracked") for k in model.backbone.model.state_dict())
    assert (
        names["roi_heads.res5.1.conv2.weight"] == model.backbone.model.layer4[1].conv2.weight.detach().numpy()
    ).all()
    r18 = save_checkpoint(MCL(**small_trunk(2, neck={"name": "interp", "out_channels": 16})), tmp_path / "r18.ckpt")
    with pytest.raises(CheckpointKindError, match=r"needs a bottleneck ResNet .* 'resnet18'.*fasterrcnn_c4"):
        export(r18, "detectron2_c4", tmp_path / "r18.pkl")


def test_detectron2_resnet_names():
    assert detectron2_resnet_name("conv1.weight") == "stem.conv1.weight"
    assert detectron2_resnet_name("layer4.2.bn3.bias") == "res5.2.conv3.norm.bias"
    assert detectron2_resnet_name("layer1.0.downsample.1.weight") == "res2.0.shortcut.norm.weight"


def test_wrong_checkpoints_and_formats_are_refused(tmp_path, capsys):
    plain = tmp_path / "plain.pth"
    torch.save(torchvision.models.resnet18().state_dict(), plain)
    with pytest.raises(CheckpointKindError, match=r"plain.pth is a bare weight file .*, not a pretraining checkpoint"):
        export(plain, "timm", tmp_path / "out.pth")
    swin = save_checkpoint(MCL(**small_trunk(2, backbone={"name": "swin_test"})), tmp_path / "swin.ckpt")
    with pytest.raises(CheckpointKindError, match="'swin_test'.*--format timm"):
        export(swin, "detectron2", tmp_path / "out.pkl")
    assert export(swin, "timm", tmp_path / "swin.pth").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main([str(plain), "--format", "timm", "--output", str(tmp_path / "x.pth")])
    assert exit_info.value.code == 2 and "not a pretraining checkpoint: mcl-export exports" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x80\x04garbage" * 50, "not a PyTorch checkpoint"),
        (b"just text\n", "not a readable checkpoint"),
        (None, "truncated"),
    ],
)
def test_unreadable_files_and_bad_outputs_get_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "in.ckpt"
    if content is None:
        save_checkpoint(MCL(**small_trunk(2)), path)
        content = path.read_bytes()[:5000]
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "--format", "timm", "--output", str(tmp_path / "x.pth")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and str(path) in error
    good = save_checkpoint(MCL(**small_trunk(2)), tmp_path / "good.ckpt")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        main([str(good), "--format", "timm", "--output", str(tmp_path / "file" / "x.pth")])
    assert "is a file, not a folder" in capsys.readouterr().err
