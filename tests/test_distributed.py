"""The helpers over ``torch.distributed`` in one process, and two processes on the CPU (gloo): gathered tensors,
global targets and labels, the gathered kNN monitor, and Lightning DDP runs through the CLI (synchronised
BatchNorm, eager and compiled)."""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from mcl import distributed
from mcl.knn import KNNAccuracy, knn_top1
from mcl.loss import MultiLevelInfoNCE

from .conftest import WORLD, join, spawn

BATCH, DIM = 4, 8


def test_without_a_process_group_there_is_one_rank_and_gathering_is_the_identity():
    tensor = torch.randn(3, 2)
    assert (distributed.world_size(), distributed.rank()) == (1, 0)
    assert distributed.gather_batch(tensor) is tensor


def gather_worker(rank: int, port: int, results) -> None:
    join(rank, port)
    gathered = distributed.gather_batch(torch.full((2, 3), float(rank), requires_grad=True))
    results[rank] = (gathered.tolist(), gathered.requires_grad, distributed.world_size(), distributed.rank())
    dist.destroy_process_group()


@pytest.mark.slow
def test_gather_batch_concatenates_in_rank_order_without_gradient():
    expected = [[0.0] * 3] * 2 + [[1.0] * 3] * 2
    assert spawn(gather_worker) == {0: (expected, False, 2, 0), 1: (expected, False, 2, 1)}


def knn_example():
    """120 bank entries and 50 queries of 5 noisy classes; rank 0 holds 70 / 30 of them, rank 1 the rest."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, DIM, generator=generator)
    bank_labels, query_labels = torch.randint(0, 5, (120,), generator=generator), torch.arange(50) % 5
    bank = centres[bank_labels] + torch.randn(120, DIM, generator=generator)
    queries = centres[query_labels] + torch.randn(50, DIM, generator=generator)
    return queries, query_labels, bank, bank_labels


def knn_worker(rank: int, port: int, results) -> None:
    join(rank, port)
    queries, query_labels, bank, bank_labels = knn_example()
    bank_rows, query_rows = (slice(0, 70), slice(0, 30)) if rank == 0 else (slice(70, None), slice(30, None))
    metric = KNNAccuracy(k=10)
    metric.update(bank[bank_rows], bank_labels[bank_rows], bank=True)
    metric.update(queries[query_rows], query_labels[query_rows], bank=False)
    results[rank] = metric.compute().item()
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_knn_monitor_scores_every_ranks_queries_against_the_whole_bank():
    """Uneven shards: every rank computes the single-process value of all queries against all bank entries."""
    expected = knn_top1(*knn_example(), k=10)
    assert 0 < expected < 100
    results = spawn(knn_worker)
    assert results == {0: pytest.approx(expected, abs=1e-4), 1: pytest.approx(expected, abs=1e-4)}


def example():
    """Global predictions/sources/targets for 2 levels: rank r owns images r*B .. r*B+B-1."""
    generator = torch.Generator().manual_seed(0)
    targets = [torch.randn(WORLD * BATCH, DIM, generator=generator) for _ in range(2)]
    sources = [[torch.randint(0, BATCH, (WORLD, n), generator=generator) for n in (BATCH, 2 * BATCH)] for _ in range(2)]
    predictions = [[torch.randn(WORLD, s.shape[1], DIM, generator=generator) for s in side] for side in sources]
    return predictions, sources, targets


def loss_of(predictions, sources, targets):
    """MCL's default loss at 2 levels on nested ``[side][level]`` inputs, keyed by ``(side, level)`` for it."""
    keyed = {
        (side, level): tensor for side, per_level in enumerate(predictions) for level, tensor in enumerate(per_level)
    }
    cells = {(side, level): tensor for side, per_level in enumerate(sources) for level, tensor in enumerate(per_level)}
    top = {(side, 0): tensor for side, tensor in enumerate(targets)}
    return MultiLevelInfoNCE(2, [0.5, 0.25], temperature=0.2)(keyed, cells, top)


def worker(rank: int, port: int, results) -> None:
    join(rank, port)
    predictions, sources, targets = example()
    local = slice(rank * BATCH, (rank + 1) * BATCH)
    total, _ = loss_of(
        [[p[rank] for p in side] for side in predictions],
        [[s[rank] for s in side] for side in sources],
        [t[local] for t in targets],
    )
    results[rank] = total.item()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_see_all_targets_with_global_labels():
    predictions, sources, targets = example()
    # Single process: every rank's cells, labels shifted to the global index of their image.
    global_sources = [[(s + torch.arange(WORLD).unsqueeze(1) * BATCH).flatten() for s in side] for side in sources]
    expected, _ = loss_of([[p.flatten(0, 1) for p in side] for side in predictions], global_sources, targets)
    results = spawn(worker)
    # Each rank averages over its own cells (equal counts), so the mean over ranks is the global loss.
    assert sum(results.values()) / WORLD == pytest.approx(expected.item(), rel=1e-5)


class SaveRankState(pl.Callback):
    """At the end of training, each rank writes ``rank{r}.pt`` to ``folder``: its state dict, the classes of its
    BatchNorm layers and dynamo's graph and graph-break counts."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch._dynamo.utils import counters

        norms = Counter(type(module).__name__ for module in pl_module.modules() if isinstance(module, _BatchNorm))
        saved = {
            "state_dict": pl_module.state_dict(),
            "norms": dict(norms),
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
        }
        torch.save(saved, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


def train_two_ranks(folder, *extra: str) -> list[dict]:
    """``mcl.train`` (the CLI) with DDP on 2 CPU processes for 3 steps of a small MCL, BatchNorm synchronised; what
    :class:`SaveRankState` saved on each rank."""
    command = [
        sys.executable,
        "-m",
        "mcl.train",
        "data=synthetic",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.sync_batchnorm=true",
        "trainer.precision=32-true",
        "+trainer.max_steps=3",
        "trainer.max_epochs=1",
        "batch_size=8",
        "logger=csv",
        "validate_at_init=false",
        "method.projector_hidden_dim=64",
        "neck.out_channels=32",
        f"+callbacks.rank_state._target_={__name__}.SaveRankState",
        f"+callbacks.rank_state.folder={folder}",
        f"hydra.run.dir={folder}",
        *extra,
    ]  # fmt: skip
    root = str(Path(__file__).resolve().parents[1])  # so that the ranks import this module for the callback
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stderr + result.stdout
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3
    ranks = [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD)]
    for saved in ranks:
        assert saved["state_dict"].keys() == checkpoint["state_dict"].keys()
        for key, value in checkpoint["state_dict"].items():  # every rank ends with the same weights and statistics
            assert torch.equal(saved["state_dict"][key], value), key
    return ranks


@pytest.mark.slow
def test_ddp_training_through_the_cli_with_sync_batchnorm_compile_and_the_online_probe(tmp_path):
    """DDP through the CLI. trainer.sync_batchnorm=true converts every BatchNorm to mcl.syncbn's, which runs on the CPU
    (gloo), and the ranks end with the same weights and running statistics: DDP broadcasts rank 0's buffers before
    each forward, but each rank then updates its own, from its own batch unless BatchNorm is synchronised. With
    method.compile=true the compiled networks (backbones, heads, projectors, predictors) trace without a graph break
    (eager DDP training runs in test_ranks and test_syncbn). The backend is
    aot_eager: dynamo traces and AOT autograd builds the backward graphs as with inductor, and the graph breaks are
    the same, but no C++ code is generated (minutes on 2 cores). The online probe rides along: DDP leaves its
    parameters out and it averages their gradients itself, so the ranks end with the same probe too (every weight is
    compared by train_two_ranks); it is outside the compiled modules."""
    overrides = ("method.compile=true", "method.compile_backend=aot_eager", "method.online_probe=true")
    for saved in train_two_ranks(tmp_path, *overrides):
        assert list(saved["norms"]) == ["SyncBatchNorm"]
        assert saved["graph_breaks"] == 0 and saved["graphs"] >= 9  # 9 compiled modules, one graph each at least
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"]["online_probe.classifier.weight"].abs().sum() > 0
    assert checkpoint["online_probe_optimizer"]["state"]
