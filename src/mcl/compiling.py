"""``torch.compile`` of a model's networks in place, and the check of its settings."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

# torch.compile's inductor modes (``compile_mode``); "default" passes no mode.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_settings(compile_mode: str, compile_backend: str) -> str:
    """Return ``compile_mode`` once it and ``compile_backend`` name a ``torch.compile`` mode and backend that go
    together; checked whether or not ``compile`` is on, so a bad value fails before a run rather than when it
    first trains."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={compile_mode!r} is invalid: use one of {COMPILE_MODES}")
    if compile_backend != "inductor":
        from torch._dynamo import list_backends  # only for another backend: the default need not import dynamo

        backends = list_backends(exclude_tags=())
        if compile_backend not in backends:
            raise ValueError(
                f"compile_backend={compile_backend!r} is invalid: use inductor (the default), or e.g. eager or "
                f"aot_eager to tell a compiler problem from a tracing one; torch knows {backends}"
            )
        if compile_mode != "default":
            raise ValueError(
                f"compile_mode={compile_mode!r} needs compile_backend=inductor (the modes are inductor's), not "
                f"{compile_backend!r}; use compile_mode=default with another backend"
            )
    return compile_mode


def compile_in_place(modules: Iterable[nn.Module], compile_mode: str, compile_backend: str) -> None:
    """Compile every module, each on its own and in place (``nn.Module.compile``).

    In place, the modules keep their parameters and names: state-dict keys and checkpoints are those of the eager
    model (no ``_orig_mod.`` prefix), optimisers and the EMA update act on the same tensors, and a deep copy or pickle
    of a module is its eager version (``nn.Module`` drops the compiled call from its state). Compilation itself is
    lazy: it happens at each module's first call, for the shapes and modes it meets. ``dynamic`` is left to torch
    (``None``): a module compiles once for the shapes of its first call, and one that meets another batch size (the
    validation batches, the target network's batch under ``bn_groups=joint``) recompiles once with a dynamic batch
    dimension rather than once per size. A module compiled already is left as it is, so calling this again does
    nothing (and on a deep copy of a compiled model, whose modules are eager, compiles them).
    """
    mode = None if compile_mode == "default" else compile_mode
    for module in modules:
        if module._compiled_call_impl is None:
            module.compile(mode=mode, backend=compile_backend)
