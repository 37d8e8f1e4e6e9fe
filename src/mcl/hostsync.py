"""Counting the operations that make the host wait for the device (host syncs), on any device.

On a GPU, an op whose result the host needs (a Python number, a shape that depends on values) blocks the CPU until
every kernel queued before it has run, so the CPU can no longer run ahead and the GPU idles while the next kernels are
launched. :class:`HostSyncCounter` records those ops as they are dispatched, so they can be counted on the CPU, where
nothing actually waits, and a test can hold a training step to a known number:

- ``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` / ``if t:`` (``is_nonzero``);
- ops whose output shape depends on values: ``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing
  (``t[mask]``, ``t[mask] = v``), ``repeat_interleave`` without ``output_size``, ``equal``;
- blocking copies from an accelerator to the CPU (``.cpu()``, ``.tolist()`` and ``.numpy()`` of a device tensor); on
  the CPU ``.tolist()`` and ``.numpy()`` reach no dispatcher, so they are counted by name while the counter is
  active.

Used by :class:`CountHostSyncs` (a Lightning callback: syncs per training-loop iteration) and by
``benchmarks/gpu_check.py`` beside ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Ops that make tensors on the host: a CPU run's stand-in for the host tensors of a GPU run.
HOST_MAKERS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
# Ops that always need a value on the host.
ALWAYS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.nonzero.out,
    aten.masked_select.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
# Indexing ops that sync when an index is a boolean mask.
MASK_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
PACKAGE_ROOT = Path(__file__).resolve().parent


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def is_host_sync(
    func: Any, args: tuple, kwargs: dict, is_host: Callable[[torch.Tensor], bool] = lambda _: False
) -> bool:
    """Whether dispatching ``func(*args, **kwargs)`` makes the host wait for the device's result; ``is_host`` tells
    the host tensors of a CPU run (see :class:`HostSyncCounter`)."""
    if func in ALWAYS:
        if func is aten.repeat_interleave.Tensor:
            return kwargs.get("output_size") is None
        return True
    if func in MASK_INDEXED:
        return any(_is_mask(index) for index in (args[1] if len(args) > 1 else ()) if index is not None)
    if func is aten._to_copy.default:
        return copies_to_host(func, args, kwargs) and not is_host(args[0])
    if func is aten.copy_.default:
        target, source = args[0], args[1]
        if not isinstance(source, torch.Tensor) or not copies_to_host(func, args, kwargs):
            return False
        return source.device.type not in ("cpu", "meta") or (is_host(target) and not is_host(source))
    return False


def copies_to_host(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` is a blocking copy to the CPU (``.cpu()``, ``.to("cpu", copy=True)``, ``host.copy_(x)``):
    from a GPU it waits for the device; a non-blocking one does not (it is ordered on the stream)."""
    non_blocking = kwargs.get("non_blocking") or (func is aten.copy_.default and len(args) > 2 and args[2])
    target = args[0].device if func is aten.copy_.default else kwargs.get("device")
    return not non_blocking and target is not None and torch.device(target).type == "cpu"


TORCH_ROOT = str(Path(torch.__file__).resolve().parent) + "/"
LOADER_ROOT = TORCH_ROOT + "utils/data/"
THIS_FILE = str(Path(__file__).resolve())
# Hooks that run on the batch before it is moved to the device: their ops are on host tensors.
HOST_HOOKS = ("on_before_batch_transfer",)


def _where() -> tuple[str, bool]:
    """The innermost frame outside torch that led to the op (``file:line function``), and whether the op works on
    host tensors in a GPU run: inside a DataLoader fetch (a dataset's ``__getitem__``, a collate function: worker
    processes in a real run) or a hook that sees the batch before its transfer (:data:`HOST_HOOKS`)."""
    frame, place, on_host = sys._getframe(2), None, False
    while frame is not None:
        path = frame.f_code.co_filename
        if place is None and not path.startswith(TORCH_ROOT) and path != THIS_FILE:
            place = f"{Path(path).name}:{frame.f_lineno} {frame.f_code.co_name}"
        if path.startswith(LOADER_ROOT) or frame.f_code.co_name in HOST_HOOKS:
            on_host = True
            break
        frame = frame.f_back
    return place or "?", on_host


@dataclass
class SyncRecord:
    """Host syncs seen so far: by op name and by the line of this library that caused them."""

    ops: Counter = field(default_factory=Counter)
    places: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    loader: int = 0

    def add(self, name: str) -> None:
        place, in_loader = _where()
        if in_loader:
            self.loader += 1
            return
        self.ops[name] += 1
        self.places[f"{name} at {place}"] += 1


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as counter: ...`` then ``counter.record.total``, ``.ops`` and ``.places`` (op and line).

    On the CPU every tensor lives on the host, so the counter tells the host tensors of a GPU run apart by how they
    were made: a blocking copy to the CPU (``.to("cpu", copy=True)``, counted itself: from a GPU it is a sync),
    ``torch.tensor(...)`` of Python data, and whatever is computed from host tensors alone; ops on those are not
    syncs. Ops of a DataLoader fetch (``num_workers=0``; worker processes in a real run) and of the hooks that see the
    batch before its transfer (:data:`HOST_HOOKS`) are counted apart (``record.loader``), not in ``total``. What a
    GPU run keeps on the host by means the counter cannot see (kornia draws its augmentation parameters on the CPU
    and checks them there) counts here and waits for nothing there: on the CPU the count is an upper bound."""

    def __init__(self):
        super().__init__()
        self.record = SyncRecord()
        self._host: dict[int, weakref.ref] = {}
        self._patched: list[tuple[str, Callable]] = []

    def is_host(self, tensor: torch.Tensor) -> bool:
        ref = self._host.get(id(tensor))
        return ref is not None and ref() is tensor

    def _mark_host(self, outputs: Any) -> None:
        for tensor in pytree.tree_leaves(outputs):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                key = id(tensor)
                self._host[key] = weakref.ref(tensor, lambda _, key=key: self._host.pop(key, None))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        on_host = bool(tensors) and all(self.is_host(tensor) for tensor in tensors)
        if not on_host and is_host_sync(func, args, kwargs, self.is_host):
            self.record.add(str(func.overloadpacket.__name__))
        out = func(*args, **kwargs)
        if on_host or func in HOST_MAKERS or (func is aten._to_copy.default and copies_to_host(func, args, kwargs)):
            self._mark_host(out)
        return out

    def __enter__(self):
        # .tolist() and .numpy() of a CPU tensor read its memory without dispatching: count them by name here.
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched.append((name, original))
            setattr(torch.Tensor, name, self._counting(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in reversed(self._patched):
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)

    def _counting(self, name: str, original: Callable) -> Callable:
        def method(tensor: torch.Tensor, *args, **kwargs):
            # A device tensor's copy to the host is dispatched and counted there.
            if tensor.device.type == "cpu" and not self.is_host(tensor):
                self.record.add(name)
            return original(tensor, *args, **kwargs)

        return method


class CountHostSyncs(pl.Callback):
    """Counts the host syncs of whole training-loop iterations: from the end of one training batch to the end of the
    next, i.e. fetching and moving the batch, ``on_after_batch_transfer`` (device views), ``training_step``,
    backward, gradient clipping, the optimiser step and the EMA update, logging. One :class:`HostSyncCounter` is
    active from the start of training to its end (so host tensors made in one step are known in the next); the first
    ``skip`` iterations are left out (the first batch also builds things once). ``per_step`` holds one
    :class:`SyncRecord` per counted iteration."""

    def __init__(self, skip: int = 1):
        self.skip = skip
        self.per_step: list[SyncRecord] = []
        self._counter: HostSyncCounter | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._counter = HostSyncCounter()
        self._counter.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._counter is None:
            return
        if trainer.global_step > self.skip:  # the iteration that just ended was the (global_step)-th
            self.per_step.append(self._counter.record)
        self._counter.record = SyncRecord()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)
