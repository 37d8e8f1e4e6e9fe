"""Bit-exact fingerprints of one training step under many configurations, to show that a refactoring changed nothing
that is computed.

Each configuration is composed from ``train.yaml`` as ``mcl-train`` composes it (a small ResNet-18 model on synthetic
data), seeded and instantiated as :func:`mcl.train.train` does; its first training batch goes through the method's
``forward_losses`` (what ``training_step`` computes), the backward pass and one step of the optimiser that
``configure_optimizers`` builds. Recorded: the loss and every per-level log as ``float.hex``, a digest of the
gradients of each top-level module, and a digest of the trainable weights after the step. One CPU thread, so the
values do not depend on the machine's core count; they do depend on the torch version and the CPU's kernels (the
reference records both, ``torch`` and ``cpu``), so record a reference of your own on another machine before a change.

``python benchmarks/fingerprint.py`` writes the reference, ``results/fingerprint.json``; ``--check`` recomputes every
configuration and exits with status 1 naming those whose values differ from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from mcl.configs import CONFIG_DIR
from mcl.methods import SupervisedMultiLevel
from mcl.validation import check_config

REFERENCE = Path(__file__).resolve().parent / "results" / "fingerprint.json"
THREADS = 1
# Every configuration: synthetic data, batch 8, 64 px (where not set again), a 32-channel pyramid.
BASE = ["data=synthetic", "batch_size=8", "image_size=64", "neck.out_channels=32", "logger=none"]
# MCL's projector and predictors, small.
SMALL_MCL = ["method.projector_hidden_dim=64", "method.embedding_dim=32"]
CONFIGURATIONS: dict[str, list[str]] = {
    "levels1": ["levels=1"],
    "levels2": ["levels=2"],
    "levels3_paper": ["preset=paper", "levels=3"],
    "levels4": ["levels=4"],
    "levels4_32px": ["levels=4", "image_size=32"],
    "official": ["preset=official"],
    "official_own_maps": ["preset=official", "method.all_pyramid_maps=false"],
    "same_level": ["loss.target_assignment=same-level"],
    "all_levels": ["loss.target_assignment=all-levels"],
    "byol": ["loss=byol"],
    "bn_plain_target": ["method.bn_groups=per_side_plain_target"],
    "bn_joint": ["method.bn_groups=joint"],
    "interp": ["neck=interp"],
    "interp_official": ["neck=interp", "preset=official"],
    "interp_stage4": ["neck=interp", "neck.stage=4"],
    "interp_stage4_32px": ["neck=interp", "neck.stage=4", "image_size=32"],
    "interp_stage4_all_maps": ["neck=interp", "neck.stage=4", "method.all_pyramid_maps=true"],
    "supervised": ["method=supervised", "levels=3"],
    "supervised_official": ["method=supervised", "preset=official", "optimizer=sgd"],
    "supervised_pooled_c5": ["method=supervised", "levels=1", "method.classifier_input=pooled_c5"],
}


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with ``count`` intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compose_config(overrides: list[str]):
    """``train.yaml`` with the base overrides, MCL's small embedding sizes (for MCL) and ``overrides``."""
    small = [] if "method=supervised" in overrides else SMALL_MCL
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[*BASE, *small, *overrides])


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """The first 16 hex digits of the SHA-256 of the tensors' bytes, in order."""
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().contiguous().numpy().tobytes())
    return sha.hexdigest()[:16]


def gradient_digests(model: torch.nn.Module) -> dict[str, str]:
    """One digest per top-level module of the gradients it received (modules without any left out)."""
    digests = {}
    for name, module in model.named_children():
        gradients = [p.grad for p in module.parameters() if p.grad is not None]
        if gradients:
            digests[name] = digest(gradients)
    return digests


def optimizer_step(model: pl.LightningModule, batch_size: int) -> None:
    """One step of the optimiser and schedule ``configure_optimizers`` builds, for a one-epoch, one-device run."""
    model._trainer = SimpleNamespace(
        estimated_stepping_batches=100,
        max_epochs=1,
        datamodule=SimpleNamespace(batch_size=batch_size),
        world_size=1,
        accumulate_grad_batches=1,
    )
    try:
        model.configure_optimizers()["optimizer"].step()
    finally:
        model._trainer = None


def fingerprint(overrides: list[str]) -> dict[str, Any]:
    """The loss, per-level logs, gradient digests and the weights' digest after one step of a configuration."""
    cfg = compose_config(overrides)
    check_config(cfg)
    with torch_threads(THREADS):
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = hydra.utils.instantiate(cfg.data)
        model = hydra.utils.instantiate(cfg.method, _convert_="all")
        datamodule.setup("fit")
        views, labels = next(iter(datamodule.train_dataloader()))
        if isinstance(model, SupervisedMultiLevel):
            loss, logs = model.forward_losses(views, labels)
        else:
            loss, logs = model.forward_losses(views)
        loss.backward()
        gradients = gradient_digests(model)
        optimizer_step(model, datamodule.batch_size)
        weights = digest(p for p in model.parameters() if p.requires_grad)
    return {
        "overrides": overrides,
        "loss": float(loss.detach()).hex(),
        "logs": {name: float(value).hex() for name, value in sorted(logs.items())},
        "gradients": gradients,
        "weights": weights,
    }


def fingerprints(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    return {name: fingerprint(CONFIGURATIONS[name]) for name in names}


def machine() -> dict[str, str]:
    """What the values depend on besides the code: the torch version and the CPU kernels it picked."""
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The fields of a configuration's fingerprint that differ from the reference, e.g. ``gradients.neck``."""
    changed = []
    for key in sorted(set(found) | set(expected)):
        if isinstance(found.get(key), dict) and isinstance(expected.get(key), dict):
            changed += [f"{key}.{sub}" for sub in differences(found[key], expected[key])]
        elif found.get(key) != expected.get(key):
            changed.append(key)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the reference instead of writing it")
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGURATIONS), help="these configurations only")
    parser.add_argument("--reference", type=Path, default=REFERENCE, help=f"default: {REFERENCE}")
    args = parser.parse_args(argv)
    names = args.only or list(CONFIGURATIONS)
    if not args.check:
        record = {**machine(), "threads": THREADS, "base": BASE, "configurations": fingerprints(names)}
        args.reference.parent.mkdir(parents=True, exist_ok=True)
        args.reference.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {len(names)} fingerprints to {args.reference}")
        return 0
    reference = json.loads(args.reference.read_text())
    for key, value in machine().items():
        if reference[key] != value:
            print(f"note: the reference was recorded with {key} {reference[key]}, this is {value}")
    failed = 0
    for name in names:
        changed = differences(fingerprint(CONFIGURATIONS[name]), reference["configurations"][name])
        failed += bool(changed)
        print(f"{name:24s} {'DIFFERS: ' + ', '.join(changed) if changed else 'identical'}", flush=True)
    print(f"{len(names) - failed} of {len(names)} configurations identical to {args.reference}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
