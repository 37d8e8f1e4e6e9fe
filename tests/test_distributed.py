"""Two processes on the CPU (gloo): global targets and labels, and a Lightning DDP run through the CLI."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mcl.loss import multi_level_loss

pytestmark = pytest.mark.slow
WORLD, BATCH, DIM = 2, 4, 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def example():
    """Global predictions/sources/targets for 2 levels: rank r owns images r*B .. r*B+B-1."""
    generator = torch.Generator().manual_seed(0)
    targets = [torch.randn(WORLD * BATCH, DIM, generator=generator) for _ in range(2)]
    sources = [[torch.randint(0, BATCH, (WORLD, n), generator=generator) for n in (BATCH, 2 * BATCH)] for _ in range(2)]
    predictions = [[torch.randn(WORLD, s.shape[1], DIM, generator=generator) for s in side] for side in sources]
    return predictions, sources, targets


def worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    predictions, sources, targets = example()
    local = slice(rank * BATCH, (rank + 1) * BATCH)
    total, _ = multi_level_loss(
        [[p[rank] for p in side] for side in predictions],
        [[s[rank] for s in side] for side in sources],
        [[t[local]] for t in targets],
        weights=[0.5, 0.25],
        temperature=0.2,
    )
    results[rank] = total.item()
    dist.destroy_process_group()


def test_two_ranks_see_all_targets_with_global_labels():
    predictions, sources, targets = example()
    # Single process: every rank's cells, labels shifted to the global index of their image.
    global_sources = [[(s + torch.arange(WORLD).unsqueeze(1) * BATCH).flatten() for s in side] for side in sources]
    expected, _ = multi_level_loss(
        [[p.flatten(0, 1) for p in side] for side in predictions],
        global_sources,
        [[t] for t in targets],
        [0.5, 0.25],
        temperature=0.2,
    )
    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), results), nprocs=WORLD, join=True)
    # Each rank averages over its own cells (equal counts), so the mean over ranks is the global loss.
    assert sum(results.values()) / WORLD == pytest.approx(expected.item(), rel=1e-5)


def test_ddp_training_through_the_cli(tmp_path):
    command = [
        sys.executable,
        "-m",
        "mcl.train",
        "data=synthetic",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.sync_batchnorm=false",
        "trainer.precision=32-true",
        "+trainer.max_steps=3",
        "trainer.max_epochs=1",
        "batch_size=8",
        "logger=csv",
        "validate_at_init=false",
        "method.projector_hidden_dim=64",
        "neck.out_channels=32",
        f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip  (SyncBatchNorm needs GPUs; on CPU the ranks keep their own BN statistics)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stderr + result.stdout
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3
