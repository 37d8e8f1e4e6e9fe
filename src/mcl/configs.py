"""Where the Hydra configs are, and the resolvers they use: what composing a config needs, and nothing heavier (no
torch, no Lightning), so that an entry point can compose and check its config before those load.

Multirun job folders (``hydra.sweep.subdir`` in ``conf/hydra/default.yaml``) are named by :func:`job_dirname`, with
the keys that the sweep varies first. Inside a job, Hydra only knows that job's own overrides (``levels=2``, not
``levels=1,2,3``), so the Hydra callback :class:`SweptKeysFirst` reads the sweep's command line before any job
starts and hands every job the keys that it fixes (:data:`FIXED_KEYS_VARIABLE`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def find_config_dir() -> str:
    """The folder of the Hydra configs: ``conf/`` at the repository root, installed as the package ``mcl.conf`` (see
    ``pyproject.toml``), wherever the package is installed or checked out."""
    import mcl.conf

    if mcl.conf.__file__ is None:  # a namespace package: a leftover folder, not the configs
        raise ImportError(
            f"mcl.conf resolves to {list(mcl.conf.__path__)}, a folder without the configs (left over from a checkout "
            "where they lived in src/mcl/conf?): remove it, or reinstall the package (pip install -e .)"
        )
    return str(Path(mcl.conf.__file__).parent)


CONFIG_DIR = find_config_dir()
DIRNAME_LIMIT = 120


def short_dirname(overrides: str, limit: int = DIRNAME_LIMIT) -> str:
    """A job folder name from its overrides: ``/`` (paths in values) becomes ``_``, and names longer than ``limit``
    are cut and end in a hash of the whole (file systems refuse names over 255 bytes; an Optuna trial's overrides
    easily exceed that)."""
    overrides = overrides.replace("/", "_")
    if len(overrides) <= limit:
        return overrides
    digest = hashlib.sha1(overrides.encode()).hexdigest()[:8]
    return f"{overrides[: limit - 9]}-{digest}"


FIXED_KEYS_VARIABLE = "MCL_SWEEP_FIXED_KEYS"


def override_keys(overrides: Iterable[str]) -> list[str]:
    """The key (or config group) of each command-line override, as ``exclude_keys`` matches it: ``levels`` for
    ``levels=2``, ``trainer.max_steps`` for ``+trainer.max_steps=5``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [override.key_or_group for override in OverridesParser.create().parse_overrides(list(overrides))]


def fixed_keys(sweep_overrides: Iterable[str]) -> list[str]:
    """The keys that a sweep's command line sets to one value (``trainer.max_epochs=1``), as opposed to those it
    sweeps (``levels=1,2,3``, ``optimizer.lr=interval(0.1,1)``); keys that only the sweeper's ``params`` set (an
    Optuna search space) are not on the command line, so they count as swept too."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(sweep_overrides))
    swept = {override.key_or_group for override in parsed if override.is_sweep_override()}
    return sorted({override.key_or_group for override in parsed} - swept)


def job_dirname(
    overrides: str | Iterable[str],
    settings: Mapping[str, Any] | None = None,
    fixed: str | None = None,
    limit: int = DIRNAME_LIMIT,
) -> str:
    """The ``mcl_dirname`` resolver: a multirun job's folder name from its overrides, swept keys first.

    ``overrides`` is the job's ``hydra.overrides.task`` (``["levels=2", "optimizer.lr=0.5"]``), ``settings`` is
    ``hydra.job.config.override_dirname`` (its ``exclude_keys`` stay out of the name; ``kv_sep`` and ``item_sep``
    join the rest) and ``fixed`` is the comma-separated keys that the sweep's command line sets to one value (see
    :class:`SweptKeysFirst`). The overrides of the other keys, those the sweeper chose for this job, come first,
    then the fixed ones, each part in alphabetical order; :func:`short_dirname` shortens the result. Without
    ``fixed`` (``None``: not known) every override is in one alphabetical list, like ``hydra.job.override_dirname``.
    A single string (``${mcl_dirname:${hydra.job.override_dirname}}``) is only shortened.
    """
    if isinstance(overrides, str):
        return short_dirname(overrides, limit)
    overrides = list(overrides)
    settings = settings or {}
    excluded = set(settings.get("exclude_keys") or ())
    fixed_set = None if fixed is None else {key for key in str(fixed).split(",") if key}
    swept: list[str] = []
    rest: list[str] = []
    for line, key in zip(overrides, override_keys(overrides), strict=True):
        if key not in excluded:
            (rest if fixed_set is not None and key in fixed_set else swept).append(line)
    joined = settings.get("item_sep", ",").join(sorted(swept) + sorted(rest))
    return short_dirname(joined.replace("=", settings.get("kv_sep", "=")), limit)


class SweptKeysFirst(Callback):
    """A Hydra callback (``hydra.callbacks`` in ``conf/hydra/default.yaml``) that lets :func:`job_dirname` tell the
    swept keys of a job from the fixed ones.

    Before the sweeper starts, it adds ``++hydra.job.env_set.MCL_SWEEP_FIXED_KEYS='<keys>'`` (:func:`fixed_keys` of
    the sweep's overrides) to the sweep's Hydra overrides, which Hydra applies to the config of every job it
    composes, whichever the sweeper (basic, Optuna) or launcher (local, submitit): a job resolves its folder name from
    its own config, on the machine where it runs. The job also sees the keys as that environment variable.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        keys = ",".join(fixed_keys(config.hydra.overrides.task))
        config.hydra.overrides.hydra.append(f"++hydra.job.env_set.{FIXED_KEYS_VARIABLE}='{keys}'")


def if_set(value: Any, then: Any, otherwise: Any) -> Any:
    """``then`` when ``value`` is set (neither null nor empty), else ``otherwise``: a config key that follows an
    optional one, e.g. ``${mcl_if_set:${data.knn_val_dir},val/knn_top1,null}`` in ``conf/data/folder.yaml``."""
    return then if value not in (None, "") else otherwise


if not OmegaConf.has_resolver("mcl_dirname"):
    OmegaConf.register_new_resolver("mcl_dirname", job_dirname)
if not OmegaConf.has_resolver("mcl_if_set"):
    OmegaConf.register_new_resolver("mcl_if_set", if_set)
