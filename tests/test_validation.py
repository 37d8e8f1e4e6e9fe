"""The config's value ranges, checked in one pass that names each wrong key, the value typed and the valid range."""

import pytest
from hydra import compose, initialize_config_dir

from mcl.configs import CONFIG_DIR
from mcl.validation import ConfigError, check_config, problems


def composed(name: str = "train", *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_every_value_out_of_range_is_named_with_its_range_at_once():
    cfg = composed(
        "train", "optimizer.lr=0", "optimizer.momentum=1.5", "optimizer.weight_decay=-1", "seed=-1",
        "trainer.max_epochs=0", "method.knn_k=0", "lr_reference_batch=0", "batch_size=1",
    )  # fmt: skip
    assert problems(cfg) == [
        "seed=-1 is out of range: the seed of everything must be an integer in [0, 4294967295]",
        "lr_reference_batch=0 is out of range: the batch the base lr is given for must be a number > 0 or null",
        "optimizer.lr=0 is out of range: the base learning rate must be a number > 0",
        "optimizer.momentum=1.5 is out of range: the optimiser's momentum must be a number in [0, 1)",
        "optimizer.weight_decay=-1 is out of range: the weight decay must be a number >= 0",
        "trainer.max_epochs=0 is out of range: epochs to train must be an integer >= 1",
        "method.knn_k=0 is out of range: neighbours of the kNN monitor must be an integer >= 1",
        "batch_size=1 on 1 device(s) is a global batch of one image: the contrastive loss then has a single target, "
        "is 0, and nothing trains; use a global batch of at least 2 (in practice 64 or more)",
    ]
    with pytest.raises(ConfigError, match=r"the config has 8 value\(s\) out of range:\n  seed=-1"):
        check_config(cfg)


def test_the_value_shown_is_the_one_typed_not_the_scaled_one():
    # AdamW's lr is scaled by 64/256 later; the message shows -1, what the user wrote.
    cfg = composed("train", "optimizer=adamw", "optimizer.lr=-1", "optimizer.betas=[0.9,1.0]")
    assert problems(cfg) == [
        "optimizer.lr=-1 is out of range: the base learning rate must be a number > 0",
        "optimizer.betas=[0.9, 1.0] is out of range: AdamW's moment decay rates (each) must be a number in [0, 1)",
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["experiment=mcl_official_r50_b4096_e100_imagenet"],
        ["experiment=mcl_swint_b1024_e100_imagenet", "preset=official"],
        ["experiment=supervised_r50_b256_e90_imagenet"],
        ["loss=byol", "optimizer=sgd", "lr_reference_batch=null", "+trainer.max_steps=-1"],
        ["method=supervised", "batch_size=1"],  # cross-entropy trains on one image
        ["trainer.devices=2", "batch_size=1", "trainer.accelerator=cpu"],  # a global batch of 2
    ],
)
def test_shipped_recipes_and_edge_values_pass(overrides):
    assert problems(composed("train", *overrides)) == []


def test_linear_and_finetune_configs_are_checked_by_the_same_rules():
    assert problems(composed("linear", "checkpoint=x")) == []
    assert problems(composed("finetune", "data.root=x", "optimizer.momentum=1")) == [
        "optimizer.momentum=1 is out of range: the optimiser's momentum must be a number in [0, 1)"
    ]
