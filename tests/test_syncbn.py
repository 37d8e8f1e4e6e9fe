"""mcl.syncbn: BatchNorm over the batch of all ranks, against a single-process BatchNorm over the concatenated batch.

That reference is what torch's ``nn.SyncBatchNorm`` computes too, but it cannot run here: it refuses CPU tensors (and
``torch.batch_norm_stats`` has no CPU kernel). Two gloo processes on the CPU hold different, unequal shards.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from pytorch_lightning.plugins import TorchSyncBatchNorm
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from mcl.heads import MLP, TileHead
from mcl.hostsync import HostSyncCounter
from mcl.runtime import instantiate_trainer
from mcl.syncbn import SyncBatchNorm, SyncBatchNormPlugin, convert_sync_batchnorm, revert_sync_batchnorm

from .conftest import WORLD, compose_train, join, spawn

# Rank 0 holds the first 3 samples of the batch of 8, rank 1 the other 5.
SHARDS = (slice(0, 3), slice(3, 8))
BATCH = 8
STEPS = 2
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor")


def example(shape: tuple[int, ...], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch far from zero mean and unit variance, and the gradient of a loss with respect to the layer's output."""
    generator = torch.Generator().manual_seed(step)
    return torch.randn(shape, generator=generator) * 2 + 3, torch.randn(shape, generator=generator)


def random_affine(layer: _BatchNorm) -> _BatchNorm:
    if layer.affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1, 1)
    return layer


def differences(reference: _BatchNorm, shape: tuple[int, ...], rank: int, **options) -> dict[str, float]:
    """Train ``reference`` on ``STEPS`` whole batches of ``shape`` and its :class:`SyncBatchNorm` copy on this rank's
    shard of them; the largest absolute differences of outputs, input gradients, summed weight and bias gradients
    and running statistics.

    Options: ``channels_last`` (the shard in that memory format; ``output_not_channels_last`` is 1 if the output is
    not), ``bf16`` (bf16 input under autocast, ``output_not_bf16`` 1 if the output is not bf16; the reference
    normalises the same values in float32).
    """
    synced = convert_sync_batchnorm(copy.deepcopy(reference))
    rows, errors = SHARDS[rank], {"output": 0.0, "input_grad": 0.0}
    for step in range(STEPS):
        input, grad = example(shape, step)
        if options.get("bf16"):
            input, grad = input.bfloat16(), grad.bfloat16().float()
        whole = input.float().requires_grad_()
        expected = reference(whole)
        expected.backward(grad)
        part = input[rows].detach().clone()
        if options.get("channels_last"):
            part = part.to(memory_format=torch.channels_last)
        part.requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(options.get("bf16"))):
            output = synced(part)
        output.backward(grad[rows].to(output.dtype))  # under bf16: the same values
        if options.get("channels_last"):
            errors["output_not_channels_last"] = float(not output.is_contiguous(memory_format=torch.channels_last))
        if options.get("bf16"):
            errors["output_not_bf16"] = float(output.dtype != torch.bfloat16)
        errors["output"] = max(errors["output"], (output.float() - expected.detach()[rows]).abs().max().item())
        errors["input_grad"] = max(errors["input_grad"], (part.grad.float() - whole.grad[rows]).abs().max().item())
    if reference.affine:
        for name in ("weight", "bias"):
            summed = getattr(synced, name).grad.clone()
            dist.all_reduce(summed)
            errors[f"{name}_grad"] = (summed - getattr(reference, name).grad).abs().max().item()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        errors[name] = (getattr(synced, name) - getattr(reference, name)).abs().max().item()
    return errors


CASES = {  # name: (layer, input shape, options of differences())
    "BatchNorm2d": (lambda: random_affine(nn.BatchNorm2d(4)), (BATCH, 4, 5, 6), {}),
    "BatchNorm2d channels_last": (lambda: random_affine(nn.BatchNorm2d(4)), (BATCH, 4, 5, 6), {"channels_last": True}),
    "BatchNorm1d (N, C)": (lambda: random_affine(nn.BatchNorm1d(6)), (BATCH, 6), {}),
    "BatchNorm1d (N, C, L) without affine": (lambda: nn.BatchNorm1d(6, affine=False), (BATCH, 6, 7), {}),
    "BatchNorm2d momentum=None": (lambda: random_affine(nn.BatchNorm2d(4, momentum=None)), (BATCH, 4, 3, 3), {}),
    "BatchNorm2d bf16 autocast": (lambda: random_affine(nn.BatchNorm2d(4)), (BATCH, 4, 5, 6), {"bf16": True}),
}


class CountCollectives:
    """Counts the calls of ``torch.distributed``'s collectives, by phase, while active."""

    def __init__(self):
        self.phase = "forward"
        self.counts: dict[str, int] = {}
        self.originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(self, name: str):
        def call(*args, **kwargs):
            key = f"{self.phase} {name}"
            self.counts[key] = self.counts.get(key, 0) + 1
            return self.originals[name](*args, **kwargs)

        return call

    def __enter__(self):
        for name in COLLECTIVES:
            setattr(dist, name, self.counting(name))
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(dist, name, original)


def count_collectives(rank: int) -> tuple[dict[str, int], int, bool]:
    """Collectives by phase and host syncs of a training call (with ``momentum=None``, whose cumulative average
    torch's BatchNorm reads on the host) and its backward, a no-grad training call (the target network's) and an eval
    call; and whether the eval call is ``F.batch_norm`` with the running statistics."""
    layer = convert_sync_batchnorm(random_affine(nn.BatchNorm2d(4, momentum=None)))
    input, grad = example((BATCH, 4, 5, 6), 0)
    input = input[SHARDS[rank]].requires_grad_()
    with CountCollectives() as collectives, HostSyncCounter() as syncs:
        output = layer(input)
        collectives.phase = "backward"
        output.backward(grad[SHARDS[rank]])
        collectives.phase = "no-grad forward"
        with torch.no_grad():
            layer(input)
        collectives.phase = "eval"
        layer.eval()
        output = layer(input)
    expected = F.batch_norm(input, layer.running_mean, layer.running_var, layer.weight, layer.bias, eps=layer.eps)
    return collectives.counts, syncs.record.total, torch.equal(output, expected)


def two_rank_worker(rank: int, port: int, results) -> None:
    join(rank, port)
    torch.manual_seed(0)
    measured = {name: differences(make(), shape, rank, **options) for name, (make, shape, options) in CASES.items()}
    results[rank] = {"differences": measured, "collectives": count_collectives(rank)}
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    """What each of the two ranks measured: one start serves every test that needs them (conftest.spawn)."""
    return spawn(two_rank_worker)


@pytest.mark.slow
def test_two_ranks_with_unequal_shards_compute_the_batchnorm_of_the_whole_batch(two_ranks):
    """Outputs, input gradients, running statistics and the ranks' summed weight and bias gradients (DDP sums
    them) equal one BatchNorm over the concatenated batch, for 2-D and 1-D layers and channels-last input."""
    for rank in range(WORLD):
        for case, errors in two_ranks[rank]["differences"].items():
            if "bf16" in case:
                continue
            for name, error in errors.items():
                assert error < 2e-5, f"rank {rank}, {case}: {name} differs by {error}"


@pytest.mark.slow
def test_under_bf16_autocast_the_statistics_are_float32(two_ranks):
    """bf16 input: the output and input gradient are bf16 (rounded), but the statistics, and with them the running
    statistics and the weight and bias gradients, match float32 ones over the same values."""
    for rank in range(WORLD):
        errors = two_ranks[rank]["differences"]["BatchNorm2d bf16 autocast"]
        assert errors["output_not_bf16"] == 0
        assert errors["output"] < 0.02 and errors["input_grad"] < 0.01  # bf16 rounding of values up to about 4
        assert max(errors[name] for name in ("weight_grad", "bias_grad", "running_mean", "running_var")) < 2e-5


@pytest.mark.slow
def test_one_all_reduce_per_forward_and_per_backward_and_no_host_sync(two_ranks):
    """Eval mode is the BatchNorm it replaced, with no collective."""
    expected_counts = {"forward all_reduce": 1, "backward all_reduce": 1, "no-grad forward all_reduce": 1}
    for rank in range(WORLD):
        assert two_ranks[rank]["collectives"] == (expected_counts, 0, True)


# ------------------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(6, 4, 5, 5), (6, 4)])
def test_without_a_process_group_it_is_the_batchnorm_it_replaced(shape, momentum):
    reference = random_affine((nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(4, momentum=momentum))
    converted = convert_sync_batchnorm(copy.deepcopy(reference))
    assert isinstance(converted, SyncBatchNorm) and not dist.is_initialized()
    for step in range(STEPS):
        input, grad = example(shape, step)
        inputs = [input.clone().requires_grad_() for _ in range(2)]
        outputs = [layer(x) for layer, x in zip((reference, converted), inputs, strict=True)]
        for output in outputs:
            output.backward(grad)
        assert torch.equal(outputs[0], outputs[1]) and torch.equal(inputs[0].grad, inputs[1].grad)
    state = converted.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in reference.state_dict().items())
    reference.eval()
    converted.eval()
    assert torch.equal(reference(input), converted(input))


def small_network() -> nn.Module:
    torch.manual_seed(0)
    network = nn.ModuleDict({"head": TileHead(8, num_convs=2), "projector": MLP(8, 16, 4, final_norm=True)})
    for module in network.modules():
        if isinstance(module, _BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(7)
    return network


def test_conversion_keeps_the_state_dict_and_the_parameters_and_reverts():
    network = small_network()
    state = {key: value.clone() for key, value in network.state_dict().items()}
    parameters = list(network.parameters())
    classes = [type(module) for module in network.modules()]
    converted = convert_sync_batchnorm(network)
    norms = [module for module in converted.modules() if isinstance(module, _BatchNorm)]
    assert len(norms) == 4 and all(isinstance(module, SyncBatchNorm) for module in norms)
    assert list(converted.state_dict()) == list(state)
    assert all(torch.equal(value, state[key]) for key, value in converted.state_dict().items())
    assert all(a is b for a, b in zip(converted.parameters(), parameters, strict=True))  # optimisers keep theirs
    reverted = revert_sync_batchnorm(converted)
    assert [type(module) for module in reverted.modules()] == classes
    assert all(torch.equal(value, state[key]) for key, value in reverted.state_dict().items())
    single = convert_sync_batchnorm(nn.BatchNorm1d(3))
    assert isinstance(single, SyncBatchNorm) and type(revert_sync_batchnorm(single)) is nn.BatchNorm1d


def test_the_lightning_plugin_converts_and_reverts():
    plugin, network = SyncBatchNormPlugin(), small_network()
    assert any(isinstance(module, SyncBatchNorm) for module in plugin.apply(network).modules())
    assert not any(isinstance(module, SyncBatchNorm) for module in plugin.revert(network).modules())


@pytest.mark.parametrize("sync", [True, False])
def test_trainer_sync_batchnorm_gives_the_trainer_this_plugin_not_torchs(sync, tmp_path):
    cfg = compose_train(
        ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"trainer.sync_batchnorm={sync}"], tmp_path
    )
    layer_sync = instantiate_trainer(cfg).strategy._layer_sync
    if sync:
        assert isinstance(layer_sync, SyncBatchNormPlugin) and not isinstance(layer_sync, TorchSyncBatchNorm)
    else:
        assert layer_sync is None


def test_a_batchnorm_that_does_more_than_normalise_is_refused_not_stripped():
    """timm's BatchNormAct2d applies its activation in its own forward; a plain SyncBatchNorm in its place would
    silently train a network without those ReLUs."""
    from timm.layers import BatchNormAct2d

    with pytest.raises(TypeError, match="BatchNormAct2d is a BatchNorm with a forward of its own"):
        convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4)))
