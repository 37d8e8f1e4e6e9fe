"""Linear evaluation: the backbone stays frozen (BN statistics too) and the probe learns."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from mcl.backbones import Backbone
from mcl.export import CheckpointKindError
from mcl.linear import LinearProbe, frozen_backbone, linear_eval
from mcl.methods import MCL
from mcl.runtime import CONFIG_DIR

from .conftest import save_checkpoint, small_trunk

pytestmark = pytest.mark.slow


def linear_cfg(checkpoint, tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "linear",
            [
                f"checkpoint={checkpoint}", "data=synthetic", "data.num_train=64", "data.num_val=32",
                "batch_size=16", "logger=none", "trainer.max_epochs=4", "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false", "optimizer.lr=0.5", *overrides,
            ],
        )  # fmt: skip
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    return cfg


def test_appendix_protocol_is_the_default_preset(tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("linear", ["checkpoint=x"])
    assert cfg.trainer.max_epochs == 100 and cfg.batch_size == 256
    assert cfg.optimizer.lr == 10.0 and cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay == 0.0


def test_probe_learns_while_the_backbone_stays_frozen(tmp_path):
    model = MCL(**small_trunk(2))
    checkpoint = save_checkpoint(model, tmp_path / "mcl.ckpt")
    before = {k: v.clone() for k, v in model.backbone.model.state_dict().items()}
    metrics = linear_eval(linear_cfg(checkpoint, tmp_path))
    assert metrics["val/top1"] > 50.0  # 4 well separated synthetic classes
    assert metrics["val/top5"] == pytest.approx(100.0)  # 4 classes: top-5 holds them all
    after = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for key, value in before.items():
        assert torch.equal(after[f"backbone.model.{key}"], value), key


def test_linear_refuses_a_foreign_checkpoint(tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save({"weights": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointKindError):
        frozen_backbone(str(plain))


def test_top1_is_the_fraction_of_images_right_and_macro_is_named_apart():
    """8 images of class 0 all right, 2 of class 1 both wrong: top-1 is 80 % of the images, the mean of per-class
    recalls (macro) 50 %."""
    probe = LinearProbe(Backbone("resnet18"), num_classes=2, optimizer=None)
    labels = torch.tensor([0] * 8 + [1] * 2)
    logits = torch.tensor([[1.0, 0.0]] * 10)
    probe.forward = lambda images: logits
    probe.validation_step((torch.zeros(10, 3, 32, 32), labels), 0)
    assert probe.top1.compute().item() == pytest.approx(0.8)
    assert probe.top1_macro.compute().item() == pytest.approx(0.5)
    assert probe.top5.compute().item() == pytest.approx(1.0)
