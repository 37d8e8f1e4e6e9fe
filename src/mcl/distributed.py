"""Thin helpers over ``torch.distributed`` that also work in a single process, with or without Lightning."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` ``(N, ...)`` from all ranks along dim 0, in rank order; no gradient flows back.

    Every rank must pass the same ``N`` (training loaders drop their last, incomplete batch).
    """
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def average_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over all ranks, in place, with one ``all_reduce`` (no host sync); nothing in a
    single process."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([tensor.flatten() for tensor in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    for tensor, mean in zip(tensors, flat.split([tensor.numel() for tensor in tensors]), strict=True):
        tensor.copy_(mean.view_as(tensor))
