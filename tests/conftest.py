"""Shared fixtures: composed Hydra configs for fast CPU runs, and small models built without them."""

from __future__ import annotations

import functools
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from mcl.loss import MultiLevelInfoNCE
from mcl.methods import MCL, SupervisedMultiLevel
from mcl.runtime import CONFIG_DIR

torch.set_num_threads(2)


def small_trunk(levels: int, **kwargs) -> dict:
    """Constructor arguments of a small multi-level module (ResNet-18 trunk, 16-channel pyramid, 64 px), seeded."""
    torch.manual_seed(0)
    return {
        "backbone": {"name": "resnet18"},
        "neck": {"name": "fpn", "out_channels": 16},
        "image_size": 64,
        "levels": levels,
        "optimizer": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        **kwargs,
    }


def small_mcl(levels: int = 2, target_assignment: str = "top", temperature: float = 1.0, **kwargs) -> MCL:
    """A small MCL (16-channel pyramid, 16-d embeddings) whose loss is MultiLevelInfoNCE with paper weights and the
    given ``target_assignment`` and ``temperature``."""
    loss = MultiLevelInfoNCE(levels, temperature=temperature, target_assignment=target_assignment)
    return MCL(**small_trunk(levels, **{"projector_hidden_dim": 32, "embedding_dim": 16, "loss": loss, **kwargs}))


def small_supervised(levels: int = 3, **kwargs) -> SupervisedMultiLevel:
    """A small supervised multi-level model (16-channel pyramid, 10 classes)."""
    return SupervisedMultiLevel(**small_trunk(levels, **{"num_classes": 10, **kwargs}))


def compose_train(
    overrides: list[str] | None = None, output_dir: Path | None = None, with_hydra: bool = False
) -> DictConfig:
    """Compose ``train.yaml`` with ``overrides``; ``output_dir`` replaces the Hydra run directory. ``with_hydra``
    keeps the ``hydra`` node (launcher, sweeper)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides or [], return_hydra_config=with_hydra)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir or Path.cwd())
    return cfg


TINY = [
    "data=synthetic",
    "batch_size=16",
    "image_size=64",
    "logger=none",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "neck.out_channels=32",
]
SMALL_MCL = ["method.projector_hidden_dim=64", "method.embedding_dim=32"]


@pytest.fixture
def tiny_cfg(tmp_path):
    """A config that trains resnet18 on 64 synthetic images for one epoch in seconds (``method=supervised`` too)."""

    def make(*extra: str) -> DictConfig:
        small = [] if "method=supervised" in extra else SMALL_MCL
        return compose_train([*TINY, *small, *extra], output_dir=tmp_path)

    return make


# ---------------------------------------------------------------- distributed
WORLD = 2  # processes in the gloo groups of the distributed tests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Ranks start from a fork server that has imported mcl.train (torch, Lightning, Hydra, timm, every method) once per
# session: a spawned rank would import them again (~10 s a test on 2 cores), and a fork of the test process itself
# can hang in its OpenMP pool.
mp.set_forkserver_preload(["mcl.train"])


def spawn(function, *args) -> dict:
    """Run ``function(rank, port, results, *args)`` in ``WORLD`` processes; returns what they put in ``results``."""
    results = mp.Manager().dict()
    arguments = (free_port(), results, *args)
    mp.start_processes(function, args=arguments, nprocs=WORLD, join=True, start_method="forkserver")
    return dict(results)


def join(rank: int, port: int) -> None:
    """Join the ``WORLD``-process gloo group as ``rank``."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(model, path):
    """What Lightning writes, reduced to what export reads."""
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path
