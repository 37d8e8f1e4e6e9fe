"""Where a pretraining of the transfer benchmark spends its time: waiting for data, the training step, validation.

``python -m benchmarks.pretrain_step [--row "MCL, 3 levels"] [--steps 12]`` composes the pretraining that
``make transfer`` runs for a row (``benchmarks/transfer.py``'s overrides and settings) and, for each view path
(``data.augment_on=cpu|device``) and worker count (0, 2), fits it for ``--steps`` steps and one validation, timing:

- **data wait**: from the end of one step to the start of the next (the DataLoader yields the batch: views made by
  the workers, or sources decoded by them; with ``augment_on=device`` the views made from the sources after the
  transfer too), over the steps after the first two;
- **step**: from the start of a step to its end (montages, forward of both networks, backward, optimiser, EMA);
- **montages**: ``build_montages`` alone on one batch of views (part of the step);
- **validation**: the kNN monitor at the epoch's end (bank and validation images, made on the CPU either way);

and the minutes a whole pretraining takes at those rates (steps per epoch x (wait + step) + validation, x epochs).
Writes ``benchmarks/results/pretrain_step.md``. The runs are what the benchmark computes, not a model of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch

from benchmarks import transfer  # the benchmark whose pretraining is measured
from mcl.data.device import SourceBatch

RESULTS = Path(__file__).resolve().parent / "results" / "pretrain_step.md"


class Clock(pl.Callback):
    """Timestamps of every training step's start and end, and of the validation."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.validation: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())

    def on_validation_start(self, *args) -> None:
        self.validation = [time.perf_counter()]

    def on_validation_end(self, *args) -> None:
        self.validation.append(time.perf_counter())


def measure(overrides: list[str], steps: int, folder: Path) -> dict[str, float]:
    cfg = transfer.composed("train", overrides, folder)
    pl.seed_everything(cfg.seed)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    datamodule.setup("fit")
    clock = Clock()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=steps, logger=False, callbacks=[clock],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=datamodule)
    waits = [start - end for start, end in zip(clock.starts[2:], clock.ends[1:-1], strict=True)]
    runs = [end - start for start, end in zip(clock.starts[2:], clock.ends[2:], strict=True)]
    batch = next(iter(datamodule.train_dataloader()))
    if isinstance(batch, SourceBatch):
        batch = datamodule.on_after_batch_transfer(batch, 0)
    views = batch[0]
    montage_times = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            for side in range(views.shape[1]):  # both augmentation sides, as a step builds them
                model.build_montages(views[:, side])
            montage_times.append(time.perf_counter() - start)
    steps_per_epoch = cfg.data.train_size // cfg.batch_size
    wait, step = statistics.median(waits), statistics.median(runs)
    validation = clock.validation[1] - clock.validation[0]
    minutes = cfg.trainer.max_epochs * (steps_per_epoch * (wait + step) + validation) / 60
    return {
        "wait": wait, "step": step, "montages": statistics.median(montage_times), "validation": validation,
        "steps_per_epoch": steps_per_epoch, "epochs": cfg.trainer.max_epochs, "minutes": minutes,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", default="MCL, 3 levels", choices=[r for r, o in transfer.ROWS.items() if o])
    parser.add_argument("--settings", default="default", choices=list(transfer.SETTINGS))
    parser.add_argument("--steps", type=int, default=12, help="steps fitted per configuration (the first 2 not timed)")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts to try, comma-separated")
    args = parser.parse_args(argv)
    settings = dict(transfer.SETTINGS[args.settings])
    base = transfer.pretrain_overrides(args.row, 0, settings)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for augment_on in ("cpu", "device"):
            for workers in (int(w) for w in args.workers.split(",")):
                extra = [f"data.augment_on={augment_on}", f"data.num_workers={workers}"]
                figures = measure([*base, *extra], args.steps, Path(scratch) / f"{augment_on}{workers}")
                rows.append((augment_on, workers, figures))
                print(augment_on, workers, {k: round(v, 3) for k, v in figures.items()}, flush=True)
    command = " ".join(["python -m benchmarks.pretrain_step", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"# Where a pretraining of the transfer benchmark spends its time: {args.row!r}, {args.settings} settings",
        "",
        f"`{command}` on {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}; one run per configuration, medians over {args.steps - 2} steps.",
        "",
        "| views made | workers | data wait (s/step) | step (s) | of which montages (s) | validation (s/epoch) "
        "| minutes per pretraining |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for augment_on, workers, f in rows:
        where = "by the workers (CPU)" if augment_on == "cpu" else "after the transfer (device path, here the CPU)"
        lines.append(
            f"| {where} | {workers} | {f['wait']:.3f} | {f['step']:.3f} | {f['montages']:.3f} | {f['validation']:.1f} "
            f"| {f['minutes']:.1f} |"
        )
    f = rows[0][2]
    lines += ["", f"{f['steps_per_epoch']} steps an epoch, {f['epochs']} epochs."]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
