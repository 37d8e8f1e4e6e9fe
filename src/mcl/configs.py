"""Where the Hydra configs are, and the resolvers they use: what composing a config needs, and nothing heavier (no
torch, no Lightning), so that an entry point can compose and check its config before those load."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


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


def if_set(value: Any, then: Any, otherwise: Any) -> Any:
    """``then`` when ``value`` is set (neither null nor empty), else ``otherwise``: a config key that follows an
    optional one, e.g. ``${mcl_if_set:${data.knn_val_dir},val/knn_top1,null}`` in ``conf/data/folder.yaml``."""
    return then if value not in (None, "") else otherwise


if not OmegaConf.has_resolver("mcl_dirname"):
    OmegaConf.register_new_resolver("mcl_dirname", short_dirname)
if not OmegaConf.has_resolver("mcl_if_set"):
    OmegaConf.register_new_resolver("mcl_if_set", if_set)
