"""``mcl-train``'s entry point (``python -m mcl.train`` too), light to import: Hydra composes the config, and its value
ranges (:func:`mcl.validation.check_config`) and world size (:func:`mcl.cluster.check_world_size`) are checked
before torch and Lightning load, so a run that cannot start says so in about a second; then
:func:`mcl.train.run_main` trains."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mcl.cluster import check_world_size
from mcl.configs import CONFIG_DIR
from mcl.validation import check_config


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    check_config(cfg)
    check_world_size(cfg)
    from mcl.train import run_main  # torch, Lightning and the library load here

    return run_main(cfg)


if __name__ == "__main__":
    main()
