"""Every config group option composes and instantiates; presets set what they say."""

from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from mcl.loss import MultiLevelBYOL, MultiLevelCrossEntropy, MultiLevelInfoNCE
from mcl.runtime import CONFIG_DIR, instantiate_callbacks, instantiate_loggers
from mcl.sides import cell_sources

from .conftest import SMALL_MCL, TINY, compose_train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def test_default_config_is_the_cpu_fashion_mnist_run():
    cfg = compose_train()
    assert cfg.levels == 3 and cfg.image_size == 64 and cfg.backbone.name == "resnet18"
    assert cfg.data._target_.endswith("FashionMNISTDataModule")
    assert cfg.loss.level_weights == "paper" and cfg.method.montage_counts == "paper"
    assert cfg.loss._target_ == "mcl.loss.MultiLevelInfoNCE" and cfg.loss.temperature == 1.0
    assert cfg.loss.target_assignment == "top" and cfg.method.loss == cfg.loss
    assert cfg.data.views_per_side == 3 and cfg.method.levels == 3 and cfg.loss.levels == 3


def test_official_preset_is_the_released_code():
    cfg = compose_train(["preset=official"])
    assert cfg.levels == 4 and cfg.method.levels == 4 and cfg.data.views_per_side == 4 and cfg.loss.levels == 4
    assert cfg.method.montage_counts == "official" and cfg.loss.level_weights == "official"
    assert cfg.method.bn_groups == "per_side" and cfg.scheduler.shape == "official"
    assert cfg.optimizer._target_ == "mcl.optim.Lars" and cfg.optimizer.lr_in_momentum is True
    assert cfg.method.no_decay_rule == "official" and cfg.method.weight_init == "official"
    assert cfg.method.all_pyramid_maps is True and cfg.scheduler.warmup_steps is None
    assert compose_train(["preset=official", "levels=3"]).method.levels == 3
    assert compose_train(["preset=official", "optimizer=sgd"]).optimizer._target_ == "torch.optim.SGD"
    recipe = compose_train(["experiment=mcl_official_r50_b4096_e100_imagenet"])
    assert recipe.optimizer.lr_in_momentum is True and recipe.method.weight_init == "official"
    assert recipe.method.all_pyramid_maps is True and recipe.scheduler.warmup_steps == 3127


def test_paper_preset_shares_cells_batchnorm_groups_and_schedule_with_the_released_code():
    cfg = compose_train(["preset=paper"])
    assert cfg.levels == 3 and cfg.method.bn_groups == "per_side" and cfg.scheduler.shape == "official"
    assert cfg.optimizer.lr_in_momentum is False
    assert cfg.method.no_decay_rule == "ndim" and cfg.method.weight_init == "default"
    assert cfg.method.all_pyramid_maps is False and compose_train().method.all_pyramid_maps is False


# What the presets computed when the method held the loss settings: InfoNCE with (level weights, temperature,
# assignment).
PRESET_LOSSES = {
    "paper": ([0.5, 0.25, 0.125], 1.0, "top"),
    "official": ([0.5, 0.25, 0.125, 0.125], 1.0, "top"),
}


@pytest.mark.parametrize("preset", sorted(PRESET_LOSSES))
def test_presets_compute_the_loss_they_computed_before_it_was_a_module(preset):
    """The composed preset's loss module gives the total and logs of InfoNCE built with the settings that the preset
    passed to the loss before the ``loss`` config group, on the same online and target passes."""
    cfg = compose_train([f"preset={preset}", "neck.out_channels=16", *SMALL_MCL])
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    weights, temperature, assignment = PRESET_LOSSES[preset]
    levels = len(weights)
    views = torch.randn(16, 2, levels, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        total, logs = model.forward_losses(views)
        model.seed_montages()  # the same montages again
        montages = [model.build_montages(views[:, side]) for side in (0, 1)]
        predictions, (targets, _) = model.online_pass(montages), model.target_pass(views, montages)
        sources = cell_sources(montages)
        loss = MultiLevelInfoNCE(levels, weights, temperature=temperature, target_assignment=assignment)
        expected, expected_logs = loss(predictions, sources, targets)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    names = ("loss", "pos_cos", "neg_cos", "collapse_std")
    assert set(logs) == set(expected_logs) == {f"{name}_level{level}" for name in names for level in range(levels)}
    for key in logs:
        assert logs[key].item() == pytest.approx(expected_logs[key].item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loss", options("loss"))
def test_loss_options_instantiate_for_the_composed_levels(loss):
    method = "supervised" if loss == "cross_entropy" else "mcl"
    cfg = compose_train([f"method={method}", f"loss={loss}", "levels=2"])
    module = hydra.utils.instantiate(cfg.loss, _convert_="all")
    expected = {"infonce": MultiLevelInfoNCE, "byol": MultiLevelBYOL, "cross_entropy": MultiLevelCrossEntropy}[loss]
    assert type(module) is expected and module.levels == 2 and module.level_weights == [0.5, 0.25]


def test_a_loss_that_does_not_suit_the_method_is_refused():
    with pytest.raises(Exception, match="MCL needs a MultiLevelContrastiveLoss loss .loss=infonce or loss=byol."):
        hydra.utils.instantiate(compose_train(["loss=cross_entropy"]).method, _convert_="all")


@pytest.mark.parametrize("method", [name for name in options("method") if not name.startswith("_")])
def test_method_options_instantiate_with_matching_views(method):
    cfg = compose_train([f"method={method}"])
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    assert isinstance(model, pl.LightningModule) and model.levels == 3
    assert (
        cfg.loss._target_
        == {"mcl": "mcl.loss.MultiLevelInfoNCE", "supervised": "mcl.loss.MultiLevelCrossEntropy"}[method]
    )
    assert model.loss.levels == 3 and model.loss.level_weights == [0.5, 0.25, 0.125]
    assert cfg.data.view_mode == {"mcl": "byol", "supervised": "supervised"}[method]
    assert cfg.optimized_metric == {"mcl": "val/knn_top1", "supervised": "val/acc"}[method]


@pytest.mark.parametrize("backbone", options("backbone"))
@pytest.mark.parametrize("neck", options("neck"))
def test_backbone_and_neck_options_build_the_model(backbone, neck):
    if backbone in ("resnet50", "swin_tiny") and neck == "interp":
        pytest.skip("large backbones are built once, with the fpn neck")
    cfg = compose_train([f"backbone={backbone}", f"neck={neck}", "image_size=64"])
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    assert model.levels == 3 and model.neck.out_channels == 256


@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_optimizer_options_are_partials(optimizer):
    cfg = compose_train([f"optimizer={optimizer}"])
    factory = hydra.utils.instantiate(cfg.optimizer)
    assert factory.keywords["lr"] > 0


@pytest.mark.parametrize("data", [name for name in options("data") if not name.startswith("_")])
def test_data_options_instantiate(data, tmp_path):
    overrides = [f"data={data}"]
    if data == "imagefolder":
        overrides += [f"data.train_dir={tmp_path}", f"data.val_dir={tmp_path}"]
    if data == "folder":
        overrides += [f"data.root={tmp_path}"]
    datamodule = hydra.utils.instantiate(compose_train(overrides).data)
    assert isinstance(datamodule, pl.LightningDataModule)
    assert datamodule.views_per_side == 3 and datamodule.image_size == 64


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_options_instantiate(trainer, tmp_path):
    cfg = compose_train([f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.precision=32-true"], tmp_path)
    assert isinstance(hydra.utils.instantiate(cfg.trainer), pl.Trainer)
    if trainer in ("ddp", "multi_node"):
        assert cfg.trainer.sync_batchnorm and cfg.trainer.strategy == "ddp"
    if trainer == "multi_node":
        assert cfg.trainer.num_nodes > 1


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_options_instantiate_without_a_wandb_key(logger, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = compose_train([f"logger={logger}"], tmp_path)
    loggers = instantiate_loggers(cfg)
    assert len(loggers) == (0 if logger == "none" else 1)
    if logger == "wandb":
        import os

        assert os.environ["WANDB_MODE"] == "offline"
    callbacks = instantiate_callbacks(cfg, has_logger=bool(loggers))
    assert any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)


@pytest.mark.parametrize("group", ["preset", "debug"])
def test_preset_and_debug_options_compose(group, tmp_path):
    for option in options(group):
        cfg = compose_train([f"{group}={option}"], tmp_path)
        OmegaConf.resolve(cfg)
        assert 1 <= cfg.levels <= 4


PAPER3, OFFICIAL4 = [0.5, 0.25, 0.125], [0.5, 0.25, 0.125, 0.125]
# The loss each recipe computed when the method held the loss settings.
EXPERIMENT_LOSSES = {
    "mcl_official_r50_b4096_e100_imagenet": (
        MultiLevelInfoNCE,
        OFFICIAL4,
        {"temperature": 1.0, "target_assignment": "top"},
    ),
    "mcl_paper_r50_b4096_e100_imagenet": (MultiLevelInfoNCE, PAPER3, {"temperature": 1.0, "target_assignment": "top"}),
    "mcl_r18_b64_e3_fmnist_cpu": (MultiLevelInfoNCE, PAPER3, {"temperature": 1.0, "target_assignment": "top"}),
    "mcl_swint_b1024_e100_imagenet": (MultiLevelInfoNCE, PAPER3, {"temperature": 1.0, "target_assignment": "top"}),
    "supervised_r18_b64_e3_fmnist_cpu": (MultiLevelCrossEntropy, PAPER3, {"label_smoothing": 0.0}),
    "supervised_r50_b256_e90_imagenet": (MultiLevelCrossEntropy, PAPER3, {"label_smoothing": 0.0}),
    "supervised_swint_b1024_e300_imagenet": (MultiLevelCrossEntropy, PAPER3, {"label_smoothing": 0.1}),
}


def test_every_experiment_has_its_expected_loss():
    assert set(EXPERIMENT_LOSSES) == set(options("experiment"))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose_and_instantiate(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}"], tmp_path)
    if cfg.data._target_.endswith("ImageFolderDataModule"):
        cfg.data.train_dir = cfg.data.val_dir = str(tmp_path)
    OmegaConf.resolve(cfg)
    assert experiment.startswith(cfg.task_name.split("_")[0])
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    assert model.levels == cfg.levels and model.image_size == cfg.image_size
    kind, weights, settings = EXPERIMENT_LOSSES[experiment]
    assert type(model.loss) is kind
    assert model.loss.settings() == {"levels": len(weights), "level_weights": weights, **settings}
    assert isinstance(hydra.utils.instantiate(cfg.data), pl.LightningDataModule)


def test_tiny_overrides_compose():
    cfg = compose_train(TINY)
    assert cfg.data.num_train == 64 and cfg.logger is None


def compose_entry(config: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config, overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    ("config", "overrides", "metric"),
    [
        ("train", [], "val/knn_top1"),
        ("train", ["method=supervised"], "val/acc"),
        ("linear", ["checkpoint=x.ckpt"], "val/top1"),
        ("finetune", ["data.root=x"], "val/AP"),
    ],
)
def test_entry_points_share_the_hydra_and_callbacks_groups(config, overrides, metric):
    """One run/sweep folder rule and one checkpoint set for every entry point; the best checkpoint follows the
    entry point's optimized_metric."""
    cfg = compose_entry(config, overrides)
    folders = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert folders["run"]["dir"] == "outputs/${task_name}/${now:%Y-%m-%d_%H-%M-%S}"
    assert folders["sweep"]["subdir"].startswith("${hydra.job.num}_${mcl_dirname:${hydra.overrides.task},")
    assert folders["callbacks"]["swept_keys_first"]["_target_"] == "mcl.configs.SweptKeysFirst"
    assert cfg.optimized_metric == metric and cfg.callbacks.checkpoint.monitor == metric
    # the run's pictures are mcl-train's alone (train.yaml): the other entry points have no montages
    assert set(cfg.callbacks) == {"checkpoint", "last", "lr_monitor"} | ({"pictures"} if config == "train" else set())
    assert cfg.callbacks.last._target_ == "mcl.checkpoints.LastCheckpoint"


def test_train_help_lists_exactly_its_own_config_groups():
    """``mcl-train --help`` names every group of train.yaml (with its options) and none of the other entry points'."""
    import subprocess
    import sys

    help_text = subprocess.run(
        [sys.executable, "-m", "mcl.launch", "--help"], check=True, capture_output=True, text=True
    ).stdout
    groups = ("method", "preset", "experiment", "data", "backbone", "neck", "optimizer", "scheduler", "loss", "trainer")
    groups += ("logger", "callbacks", "search", "cluster", "debug")
    section = help_text.split("Config groups")[1].split("Main keys")[0].splitlines()[1:]
    assert sorted(line.split()[0] for line in section if line.strip()) == sorted(groups)
    for group in set(groups) - {"experiment"}:  # every option of the group is named (recipes: the default and a few)
        line = next(line for line in help_text.splitlines() if line.strip().startswith(group + " "))
        assert all(option in line for option in options(group) if not option.startswith("_")), (group, line)
    assert "detection_schedule" not in help_text and "protocol" not in help_text
