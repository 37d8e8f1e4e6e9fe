"""Host syncs: the counter recognises the ops that make the host wait for the device, and a training-loop iteration
makes a known, small number of them (both methods, both view paths, 3 levels)."""

import hydra
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mcl.hostsync import CountHostSyncs, HostSyncCounter

from .conftest import SMALL_MCL, TINY, compose_train


def test_the_counter_sees_the_ops_that_wait_for_a_value():
    x = torch.arange(6.0)
    with HostSyncCounter() as counter:
        x.sum().item()
        bool(x.max() > 3)
        x.nonzero()
        x[x > 2]
        x[torch.tensor([0, 2])]  # integer indices: no sync
        x.tolist()
        (x * 2).mul_(3).sum()  # device work only
    assert dict(counter.record.ops) == {"_local_scalar_dense": 2, "nonzero": 1, "index": 1, "tolist": 1}
    assert any("test_hostsync.py" in place for place in counter.record.places)


def test_a_copy_to_the_host_is_one_sync_and_what_is_read_from_it_then_is_none():
    loss = torch.tensor(2.5) * torch.ones(())  # computed: a device tensor in a GPU run
    with HostSyncCounter() as counter:
        host = loss.to("cpu", copy=True)
        float(host), host.tolist(), (host * 2).item()
        loss.to("cpu", non_blocking=True)  # ordered on the stream: no wait
    assert dict(counter.record.ops) == {"_to_copy": 1}


def test_what_a_dataloader_computes_is_host_work_counted_apart():
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.rand(3).max().item()

    with HostSyncCounter() as counter:
        list(DataLoader(Items(), batch_size=2))
    assert counter.record.total == 0 and counter.record.loader >= 4


def count_per_step(*overrides: str, steps: int = 3) -> list[dict]:
    """Syncs of the training-loop iterations 2..``steps`` (the first builds things once)."""
    small = [] if "method=supervised" in overrides else SMALL_MCL
    cfg = compose_train([*TINY, *small, "levels=3", "batch_size=8", "data.num_train=48", *overrides])
    pl.seed_everything(0)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    counter = CountHostSyncs(skip=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        callbacks=[counter],
    )
    trainer.fit(model, datamodule=datamodule)
    assert len(counter.per_step) == steps - 1
    return [dict(record.ops) for record in counter.per_step]


# Syncs per iteration with the default intervals (nothing periodic falls in steps 2..3). The device views' two are
# kornia's check of the blur sigmas it draws: kornia draws them on the CPU, so on a GPU they wait for nothing.
LIMITS = {("mcl", "cpu"): 0, ("mcl", "device"): 2, ("supervised", "cpu"): 0, ("supervised", "device"): 0}


@pytest.mark.parametrize(("method", "augment_on"), list(LIMITS))
def test_a_training_step_makes_at_most_its_known_host_syncs(method, augment_on):
    per_step = count_per_step(f"method={method}", f"data.augment_on={augment_on}")
    limit = LIMITS[method, augment_on]
    assert all(sum(ops.values()) == limit for ops in per_step), per_step
    if limit:
        assert all(ops == {"_local_scalar_dense": 2} for ops in per_step)


def test_the_periodic_reads_come_every_n_steps_and_only_then():
    """Every 2nd step: the progress bar's host copy of the loss, and one read of the non-finite guard."""
    per_step = count_per_step("trainer.log_every_n_steps=2", "method.finite_check_every=2", steps=4)
    # Iterations ending at global steps 2, 3, 4. The guard is read when step 2 has ended, after this count's callback
    # closed that iteration, and the bar's copy is taken in the step that runs at global step 2.
    assert per_step == [{}, {"tolist": 1, "_to_copy": 1}, {}]


@pytest.mark.parametrize("method", ["mcl", "supervised"])
def test_the_online_probe_adds_no_host_sync(method):
    """The probe's step (features taken from the online pass, its own backward and SGD step, the batch's top-1 by
    torchmetrics without argument checks) and its logs make the host wait for nothing."""
    per_step = count_per_step(f"method={method}", "method.online_probe=true")
    assert all(sum(ops.values()) == LIMITS[method, "cpu"] for ops in per_step), per_step
