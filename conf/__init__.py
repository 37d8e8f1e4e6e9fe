"""Hydra configs, shipped with the package so that the console script finds them."""
