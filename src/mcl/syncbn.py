"""BatchNorm with statistics over all ranks: one all_reduce per forward call, one per backward call, no host sync.

torch's ``nn.SyncBatchNorm`` runs on CUDA/XPU inputs only, and its forward all_gathers every rank's (mean, invstd,
count), then indexes them with a boolean mask, which makes the host wait for the device at every call. MCL under
``bn_groups=per_side`` calls BatchNorm a few hundred times per training step, so here the forward sums three
per-channel statistics of all ranks in one all_reduce (``dist.all_reduce``, which ``torch.compile`` traces as a
functional collective), and the backward sums the two per-channel gradient reductions in another. Counts enter
the sum, so ranks may hold batches of different sizes. Inputs are ``(N, C, *)`` on any device, in any memory
format; statistics are computed in float32 whatever the input's dtype (bf16 under autocast).

:class:`SyncBatchNorm` subclasses ``nn.modules.batchnorm._BatchNorm`` (not ``nn.SyncBatchNorm``, which DDP refuses
on the CPU), so code that looks for BatchNorm layers finds it and the state-dict keys are those of the layer it
replaced. :func:`convert_sync_batchnorm` and :func:`revert_sync_batchnorm` swap the layers of a model, and
:class:`SyncBatchNormPlugin` does so for a Lightning Trainer (``trainer.sync_batchnorm=true``, see
:func:`mcl.runtime.instantiate_trainer`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.plugins import LayerSync
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def channel_view(statistic: torch.Tensor, dims: int) -> torch.Tensor:
    """A per-channel ``(C,)`` statistic shaped ``(1, C, 1, ...)`` to broadcast against a ``dims``-D input."""
    return statistic.view(1, -1, *([1] * (dims - 2)))


def reduced_dims(input: torch.Tensor) -> list[int]:
    """Every dimension of an ``(N, C, *)`` input but the channels'."""
    return [0, *range(2, input.dim())]


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``tensor``, summed in place over the ranks of ``group``. ``dist.all_reduce``: eager, it is the process
    group's own collective (0.7 ms a call on 2 gloo CPU ranks, against 2.2 ms for a functional collective);
    ``torch.compile`` traces it as a functional collective, without a graph break."""
    dist.all_reduce(tensor, group=group)
    return tensor


@torch.no_grad()
def global_statistics(input: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``input`` ``(N, C, *)`` over all ranks of ``group``, and the global
    count of values per channel (a 0-D tensor), in float32, from one all_reduce.

    Each rank contributes its count ``n``, ``n * mean`` and ``M2 + n * mean**2``, with its own mean and ``M2`` (sum
    of squared deviations from that mean) computed in two float32 passes; the global ``M2`` is then
    ``sum - N * mean**2``. That subtraction cancels when a channel's mean is large against its spread, so these
    ``C``-sized terms and their sum are float64 (a negligible cost): a relative error of about
    ``2**-52 * (mean / std)**2``. (Two passes rather than ``torch.var_mean``, which is 10x slower on the CPU.)
    """
    count = input.numel() // input.shape[1]
    dims = reduced_dims(input)
    if count:
        mean = input.sum(dims, dtype=torch.float32) / count
        squares = (input - channel_view(mean, input.dim())).square_().sum(dims)
        mean, squares = mean.double(), squares.double()
    else:  # an empty shard still joins the all_reduce, adding zeros
        mean = squares = input.new_zeros(input.shape[1], dtype=torch.float64)
    counts = torch.full((1,), count, dtype=torch.float64, device=input.device)
    totals = all_reduce_sum(torch.cat([counts, count * mean, squares + count * mean.square()]), group)
    total_count, sums, square_sums = totals[0], *totals[1:].chunk(2)
    mean = sums / total_count
    variance = (square_sums / total_count - mean.square()).clamp_min(0)  # rounding may leave a tiny negative
    return mean.float(), variance.float(), total_count.float()


class SyncedNormalize(torch.autograd.Function):
    """``(input - mean) * invstd * weight + bias`` with statistics that :func:`global_statistics` computed over all
    ranks; the backward gives the exact gradient through those statistics with one all_reduce (of the per-channel
    sums of ``grad`` and ``grad * (input - mean)``). ``weight`` and ``bias`` get this rank's share of their gradient,
    as any parameter does under DDP, which then sums (averages) the ranks'. Computed in float32, the forward as
    ``input * scale + shift`` with per-channel ``scale`` and ``shift`` (as torch's CPU kernel does); the output and
    the input's gradient have the input's dtype and memory format."""

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        count: torch.Tensor,
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        ctx.save_for_backward(input, weight, mean, invstd, count)
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        dims = input.dim()
        return (input * channel_view(scale, dims)).add_(channel_view(shift, dims)).to(input.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight, mean, invstd, count = ctx.saved_tensors
        dims, reduced = input.dim(), reduced_dims(input)
        centred = input - channel_view(mean, dims)  # float32
        grad_sum = grad_output.sum(reduced, dtype=torch.float32)
        grad_centred_sum = (grad_output * centred).sum(reduced)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            totals = all_reduce_sum(torch.cat([grad_sum, grad_centred_sum]), ctx.group)
            grad_mean, grad_centred_mean = (totals / count).chunk(2)
            scale = invstd if weight is None else invstd * weight
            # (grad - grad_mean - centred * invstd**2 * grad_centred_mean) * scale, in place of centred
            centred_scale, shift = -invstd.square() * grad_centred_mean * scale, -grad_mean * scale
            centred.mul_(channel_view(centred_scale, dims)).add_(channel_view(shift, dims))
            grad_input = centred.addcmul_(grad_output, channel_view(scale, dims)).to(input.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (grad_centred_sum * invstd).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_sum.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over ``(N, C, *)`` inputs whose training-mode statistics are those of the whole batch across the
    ranks of ``process_group`` (the default group when ``None``): 1 all_reduce per forward call, 1 per backward call,
    no host sync. The output, the gradients of the input (the concatenated batch's, on each rank's rows) and the
    running statistics equal a single BatchNorm over the batch of all ranks; ``weight`` and ``bias`` get this rank's
    share of the gradient, which DDP's gradient all_reduce completes.

    In eval mode, or without a process group of several ranks, it is the ``_BatchNorm`` it replaced (``F.batch_norm``).
    Running statistics follow torch's rule: ``momentum`` (``None``: cumulative average, computed on the device),
    variance unbiased over the global count.

    ``reverts_to`` is the class :func:`revert_sync_batchnorm` builds again (``nn.BatchNorm2d`` unless converted from
    another).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        self.reverts_to: type[_BatchNorm] = nn.BatchNorm2d

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects (N, C, *) input, got {input.dim()}-D input {tuple(input.shape)}")

    def synced_group(self) -> dist.ProcessGroup | None:
        """The group whose ranks share statistics, or ``None`` when there is nothing to synchronise."""
        if not self.training or not dist.is_available() or not dist.is_initialized():
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self.synced_group()
        if group is None:
            return super().forward(input)
        self._check_input_dim(input)
        mean, variance, count = global_statistics(input, group)
        if self.track_running_stats:
            self.update_running_statistics(mean, variance, count)
        invstd = torch.rsqrt(variance + self.eps)
        return SyncedNormalize.apply(input, self.weight, self.bias, mean, invstd, count, group)

    @torch.no_grad()
    def update_running_statistics(self, mean: torch.Tensor, variance: torch.Tensor, count: torch.Tensor) -> None:
        """torch's update with the global statistics: ``running = (1 - m) * running + m * batch`` with the unbiased
        variance ``variance * N / (N - 1)``; ``m = momentum``, or ``1 / num_batches_tracked`` when it is ``None``
        (a tensor, so the host does not wait to read the count)."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.float() if self.momentum is None else self.momentum
        unbiased = variance * (count / (count - 1))
        self.running_mean.mul_(1 - factor).add_(mean * factor)
        self.running_var.mul_(1 - factor).add_(unbiased * factor)


def _copy_state(source: _BatchNorm, target: _BatchNorm) -> _BatchNorm:
    """``target`` with ``source``'s parameters and buffers (the same tensors) and training mode."""
    if source.affine:
        target.weight, target.bias = source.weight, source.bias
    target.running_mean, target.running_var = source.running_mean, source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """``module`` with every ``_BatchNorm`` in it (itself included) replaced by a :class:`SyncBatchNorm` that holds
    the same parameters and buffers; like ``nn.SyncBatchNorm.convert_sync_batchnorm``, the returned module is
    ``module`` itself unless it is a BatchNorm. Layers converted already get ``process_group``."""
    if isinstance(module, SyncBatchNorm):
        module.process_group = process_group
        return module
    converted = module
    if isinstance(module, _BatchNorm) and type(module).forward not in (_BatchNorm.forward, nn.SyncBatchNorm.forward):
        # e.g. timm's BatchNormAct2d (norm, then its activation): a plain SyncBatchNorm would drop what it adds
        raise TypeError(
            f"{type(module).__name__} is a BatchNorm with a forward of its own (it does more than normalise), which "
            "synchronised BatchNorm would silently drop: use a backbone with plain BatchNorm layers or "
            "trainer.sync_batchnorm=false"
        )
    if isinstance(module, _BatchNorm):
        converted = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, process_group
        )
        converted.reverts_to = type(module)
        _copy_state(module, converted)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """The inverse of :func:`convert_sync_batchnorm`: each :class:`SyncBatchNorm` becomes its ``reverts_to`` class
    again, with the same parameters and buffers."""
    converted = module
    if isinstance(module, SyncBatchNorm):
        original = module.reverts_to(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        converted = _copy_state(module, original)
    for name, child in module.named_children():
        converted.add_module(name, revert_sync_batchnorm(child))
    return converted


class SyncBatchNormPlugin(LayerSync):
    """Lightning's ``LayerSync`` with :class:`SyncBatchNorm`: the DDP and FSDP strategies apply it when fitting
    starts and revert it at teardown, on the CPU (gloo) as on GPUs (NCCL). Pass it in ``Trainer(plugins=[...])``
    with ``sync_batchnorm=False`` (Lightning refuses both, and would otherwise apply torch's)."""

    def __init__(self, process_group: dist.ProcessGroup | None = None):
        self.process_group = process_group

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_sync_batchnorm(model, self.process_group)

    def revert(self, model: nn.Module) -> nn.Module:
        return revert_sync_batchnorm(model)
