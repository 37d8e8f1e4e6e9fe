"""Ranks stay independent, also after a resume: each rank's montage generator is saved and restored as its own, and
torch's global generators get a stream per rank at each epoch (what the model draws from them, e.g. DropPath,
differs across ranks). Two gloo processes on the CPU."""

import logging
import os

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from mcl.data.datamodules import EpochShuffle, global_seed
from mcl.methods.mcl import MCL
from mcl.montage_streams import GENERATOR_STATES, montage_seed
from mcl.train import train

from .conftest import SMALL_MCL, TINY, WORLD, compose_train, join, small_trunk, spawn


def shuffle_worker(rank: int, port: int, results) -> None:
    join(rank, port)
    sampler = EpochShuffle(list(range(11)), seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    results[rank] = (order, len(sampler), torch.rand(4).tolist())
    dist.destroy_process_group()


@pytest.mark.slow
def test_epoch_shuffle_splits_one_order_and_gives_each_rank_its_own_global_stream():
    results = spawn(shuffle_worker)
    whole = torch.randperm(11, generator=torch.Generator().manual_seed(3 * 1_000_003 + 2)).tolist()
    # One order of (seed, epoch), dealt out rank by rank; the odd item at the end is left out of the epoch.
    assert results[0][:2] == (whole[0:10:2], 5) and results[1][:2] == (whole[1:10:2], 5)
    # Rank 0 keeps the single-process stream, rank 1 draws its own.
    torch.manual_seed(global_seed(3 * 1_000_003 + 2, 0))
    assert results[0][2] == torch.rand(4).tolist()
    assert results[0][2] != results[1][2]


class RecordDraws(pl.Callback):
    """Per training step: the montage cell layouts this rank drew, and a DropPath-like draw from torch's global
    generator; after the first epoch, a checkpoint to resume from. Each rank writes what it saw to ``folder``."""

    def __init__(self, folder: str, checkpoint: str | None = None):
        self.folder, self.checkpoint = folder, checkpoint
        self.layouts: dict[int, list] = {}
        self.draws: dict[int, list] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        build = pl_module.build_montages

        def recording(views):
            montages = build(views)
            self.layouts[trainer.global_step] = [sources.tolist() for _, sources in montages]
            return montages

        pl_module.build_montages = recording

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.draws[trainer.global_step] = torch.rand(3).tolist()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.checkpoint and trainer.current_epoch == 0:
            trainer.save_checkpoint(self.checkpoint)  # every rank takes part: the generator states are gathered

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(
            {"layouts": self.layouts, "draws": self.draws}, os.path.join(self.folder, f"rank{trainer.global_rank}.pt")
        )


def ddp_worker(rank: int, port: int, results, folder: str, extra: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    os.environ.update(RANK=str(rank), OMP_NUM_THREADS="1")
    rank_zero_only.rank = rank  # read from the environment when Lightning was imported, before it was set here
    torch.set_num_threads(1)
    overrides = [
        *TINY,
        *SMALL_MCL,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.sync_batchnorm=false",
        "trainer.precision=32-true",
        "batch_size=8",
        "data.num_train=32",
        "data.num_val=16",
        "validate_at_init=false",
        "method.knn_k=4",
        f"+callbacks.record._target_={__name__}.RecordDraws",
        f"+callbacks.record.folder={folder}",
        *extra,
    ]
    train(compose_train(overrides, output_dir=folder))


def run_two_ranks(folder, *extra: str) -> list[dict]:
    folder.mkdir()
    spawn(ddp_worker, str(folder), list(extra))
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.slow
def test_after_a_resume_each_rank_draws_what_the_uninterrupted_run_drew(tmp_path):
    """2 epochs of 2 steps on 2 ranks, against the first epoch's checkpoint resumed for the second."""
    checkpoint = tmp_path / "epoch1.ckpt"
    whole = run_two_ranks(tmp_path / "whole", "trainer.max_epochs=2", f"+callbacks.record.checkpoint={checkpoint}")
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["global_step"] == 2 and saved[GENERATOR_STATES].shape[0] == WORLD
    assert not torch.equal(saved[GENERATOR_STATES][0], saved[GENERATOR_STATES][1])
    resumed = run_two_ranks(tmp_path / "resumed", "trainer.max_epochs=2", f"ckpt_path={checkpoint}")
    for rank in range(WORLD):
        assert sorted(whole[rank]["layouts"]) == [0, 1, 2, 3] and sorted(resumed[rank]["layouts"]) == [2, 3]
        for step in (2, 3):
            assert resumed[rank]["layouts"][step] == whole[rank]["layouts"][step]
            assert resumed[rank]["draws"][step] == whole[rank]["draws"][step]
    for step in range(4):
        assert whole[0]["layouts"][step] != whole[1]["layouts"][step]  # cell layouts differ across ranks
        assert whole[0]["draws"][step] != whole[1]["draws"][step]  # so does what the model draws


def test_states_of_another_world_size_restart_from_seed_rank_and_step(caplog):
    model = MCL(**small_trunk(2), seed=5)
    two_ranks = torch.stack([model.generator.get_state()] * 2)
    with caplog.at_level(logging.WARNING, logger="mcl.montage_streams"):
        model.montage_stream.restore(two_ranks, 40, model.generator.device)
    assert "holds 2 rank(s)' states for 1 rank(s)" in caplog.text
    expected = torch.Generator().manual_seed(montage_seed(5, 0, 40))
    assert torch.equal(model.generator.get_state(), expected.get_state())
    # The same world size restores the saved state itself.
    other = torch.Generator().manual_seed(123).get_state()
    model.montage_stream.restore(other.unsqueeze(0), 40, model.generator.device)
    assert torch.equal(model.generator.get_state(), other)
