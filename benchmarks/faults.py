"""Fault cases against ``mcl-train`` (and ``mcl-finetune``'s inputs): kills during training and during a checkpoint
write, SIGTERM and SIGINT mid-epoch, concurrent runs, reruns that fail their checks, a damaged ``last.ckpt``, a
diverging resume, a full device, a read-only run folder, unreadable images and annotation files. Prints how many
survived and whether any result was lost.

``make faults`` (``.venv/bin/python benchmarks/faults.py``); writes ``benchmarks/results/faults.md``. Each case runs
tiny synthetic jobs in a temporary folder (about 10 minutes in all on 2 CPU cores). The full-device and read-only
cases mount small tmpfs file systems, which needs root; without it they are reported as not tried.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mcl.checkpoints import CheckpointError, load_checkpoint
from mcl.results import job_status

RESULTS = Path(__file__).resolve().parent / "results" / "faults.md"
TINY = [
    "data=synthetic", "data.num_train=64", "batch_size=16", "logger=csv", "validate_at_init=false",
    "neck.out_channels=16", "method.projector_hidden_dim=32", "method.embedding_dim=16",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
]  # fmt: skip
# A Python prelude that makes the second write of last.ckpt die half-way, as a kill during torch.save would.
DIE_IN_SECOND_SAVE = """
import os, sys, torch
calls = []
real = torch.save
def save(obj, file, *args, **kwargs):
    if ".last.ckpt." in str(file):
        calls.append(1)
        if len(calls) == 2:
            open(file, "wb").write(b"PK half a checkpoint"); os._exit(137)
    return real(obj, file, *args, **kwargs)
torch.save = save
from mcl.train import main
sys.argv = ["mcl-train", *sys.argv[1:]]
main()
"""


# 16 steps an epoch, so that a signal sent after the first epoch's checkpoint lands mid-epoch.
LONGER = ["data.num_train=256", "trainer.max_epochs=2", "image_size=32"]
ENV = {**os.environ, "WANDB_MODE": "disabled"}


def command(folder: Path, *overrides: str, program: str = "mcl-train", base: list[str] | None = None) -> list[str]:
    """``program`` on ``folder`` with ``base`` (default: the tiny run for ``mcl-train``, nothing else) and
    ``overrides``."""
    base = (TINY if program == "mcl-train" else []) if base is None else base
    return [str(Path(sys.executable).parent / program), *base, f"hydra.run.dir={folder}", *overrides]


def run(folder: Path, *overrides: str, **how: object) -> subprocess.CompletedProcess:
    return subprocess.run(command(folder, *overrides, **how), capture_output=True, text=True, timeout=900, env=ENV)


def said(result: subprocess.CompletedProcess, text: str) -> bool:
    """Whether a run printed ``text`` (Hydra sends log lines to stdout and errors to stderr)."""
    return text in result.stdout + result.stderr


def digest(folder: Path) -> dict[str, str]:
    """Content hashes of every file in the run folder: metrics, run state, checkpoints, config, log, CSV logs."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder / "checkpoints" / "last.ckpt")["state_dict"]


def same_weights(first: Path, second: Path) -> bool:
    a, b = weights(first), weights(second)
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@contextmanager
def small_mount(folder: Path, options: str):
    """A tmpfs mounted at ``folder`` (``size=...``, ``ro``); yields ``False`` when it cannot be mounted (not root)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                                   capture_output=True).returncode == 0  # fmt: skip
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], capture_output=True)


def readable(folder: Path) -> bool:
    """Every checkpoint loads and metrics.json parses."""
    try:
        for path in folder.glob("checkpoints/*.ckpt"):
            load_checkpoint(path)
        json.loads((folder / "metrics.json").read_text())
    except (CheckpointError, FileNotFoundError, json.JSONDecodeError):
        return False
    return True


def last_step(folder: Path) -> int:
    return load_checkpoint(folder / "checkpoints" / "last.ckpt")["global_step"]


def finished(folder: Path, steps: int) -> bool:
    return (
        readable(folder)
        and last_step(folder) == steps
        and json.loads((folder / "run.json").read_text())["status"] == "finished"
    )


# ------------------------------------------------------------------------------------------------------- cases
def kill_during_training(folder: Path) -> tuple[bool, bool, str]:
    process = subprocess.Popen(
        command(folder, "trainer.max_epochs=3"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = folder / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = last_step(folder)
    status = job_status(folder)
    rerun = run(folder, "trainer.max_epochs=3")
    return (
        rerun.returncode == 0 and finished(folder, 12) and status == "dead",
        saved > 12 or not readable(folder),
        f"killed at step >= {saved}; mcl-collect said {status}; rerun resumed to 12",
    )


def kill_during_checkpoint_write(folder: Path) -> tuple[bool, bool, str]:
    died = subprocess.run(
        [sys.executable, "-c", DIE_IN_SECOND_SAVE, *command(folder, "trainer.max_epochs=3")[1:]],
        capture_output=True, text=True, timeout=900, env=ENV,
    )  # fmt: skip
    try:
        intact, lost = last_step(folder), False  # the file of the first save, whole
    except CheckpointError:
        intact, lost = None, True
    left = [p.name for p in folder.glob("checkpoints/.*.tmp")]
    rerun = run(folder, "trainer.max_epochs=3")
    removed = left and not list(folder.glob("checkpoints/.*.tmp")) and said(rerun, "left by a write that was")
    survived = died.returncode == 137 and rerun.returncode == 0 and finished(folder, 12) and removed
    return (
        survived,
        lost,
        f"last.ckpt stayed at step {intact}; the rerun removed the temporary file {left[0] if left else None} and "
        "resumed to 12",
    )


def concurrent_runs(folder: Path) -> tuple[bool, bool, str]:
    # 32 steps: the first run still holds the folder when the second, after its imports, reaches the lock.
    first = subprocess.Popen(
        command(folder, "seed=1", "trainer.max_epochs=1", "data.num_train=512"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    lock = folder / ".mcl-run.lock"
    while not lock.exists() and first.poll() is None:
        time.sleep(0.1)
    second = run(folder, "seed=2", "trainer.max_epochs=1", "data.num_train=512")
    first.communicate(timeout=900)
    refused = second.returncode != 0 and said(second, "in use by process")
    config = (folder / ".hydra" / "config.yaml").read_text()
    seed_ok = "seed: 1" in config
    return (
        refused and first.returncode == 0 and finished(folder, 32),
        not seed_ok,
        "second run refused, naming the first",
    )


def rerun_finished(folder: Path) -> tuple[bool, bool, str]:
    first = run(folder, "trainer.max_epochs=1")
    before = digest(folder)
    again = run(folder, "trainer.max_epochs=1")
    notice = said(first, "weights_only")
    return (
        again.returncode == 0 and said(again, "already holds a finished run") and not notice,
        digest(folder) != before,
        f"nothing rewritten (log and CSV included); weights_only notice printed: {'yes' if notice else 'no'}",
    )


# A rerun with each of these fails, naming the problem, and leaves the finished run's folder as it was.
FAILING_RERUNS = {
    ("levels=5",): "levels=5",
    ("batch_size=1",): "batch_size=1 on 1 device(s)",
    ("data.num_train=8",): "the training set has 8 images, fewer than data.batch_size=16",
    ("optimizer.lr=0",): "optimizer.lr=0 is out of range",
    ("optimizer=adamw", "optimizer.lr=-1"): "optimizer.lr=-1 is out of range",
    ("optimizer.momentum=1.5",): "optimizer.momentum=1.5 is out of range",
    ("optimizer.momentum=-0.1",): "optimizer.momentum=-0.1 is out of range",
    ("optimizer.weight_decay=-1",): "optimizer.weight_decay=-1 is out of range",
    ("seed=-1",): "seed=-1 is out of range",
    ("trainer.max_epochs=0",): "trainer.max_epochs=0 is out of range",
    ("method.knn_k=0",): "method.knn_k=0 is out of range",
    ("lr_reference_batch=0",): "lr_reference_batch=0 is out of range",
}


def failing_rerun(folder: Path) -> tuple[bool, bool, str]:
    run(folder, "trainer.max_epochs=1")
    before = digest(folder)
    named, changed = 0, []
    for overrides, message in FAILING_RERUNS.items():
        extra = () if any(o.startswith("trainer.max_epochs") for o in overrides) else ("trainer.max_epochs=2",)
        bad = run(folder, *overrides, *extra)
        named += bad.returncode != 0 and said(bad, message)
        if digest(folder) != before:
            changed.append(" ".join(overrides))
    return (
        named == len(FAILING_RERUNS),
        bool(changed),
        f"{named} of {len(FAILING_RERUNS)} reruns (levels=5, batch_size=1, fewer images than the batch, lr 0 / -1 "
        "with AdamW, momentum 1.5 / -0.1, weight decay -1, seed -1, max_epochs 0, knn_k 0, lr_reference_batch 0) "
        f"stopped naming the key and value; files changed: {', '.join(changed) or 'none'}",
    )


def damaged_last_checkpoint(folder: Path) -> tuple[bool, bool, str]:
    run(folder, "trainer.max_epochs=2")
    last = folder / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:2000])
    rerun = run(folder, "trainer.max_epochs=3")
    fell_back = said(rerun, "cannot be read; resuming from")
    best_kept = any(p.name.startswith("epoch") for p in folder.glob("checkpoints/*.ckpt"))
    survived = rerun.returncode == 0 and fell_back and finished(folder, 12)
    return survived, not (best_kept and readable(folder)), "resumed from the best checkpoint"


def diverging_resume(folder: Path) -> tuple[bool, bool, str]:
    run(folder, "trainer.max_epochs=1")
    before = digest(folder)
    bad = run(
        folder, "trainer.max_epochs=2", "optimizer=sgd", "optimizer.lr=1e12", "callbacks.last.every_n_train_steps=1"
    )
    kept = digest(folder)
    lost = {k: v for k, v in before.items() if k.endswith(".ckpt")} != {
        k: v for k, v in kept.items() if k.endswith(".ckpt")
    }
    return (
        bad.returncode != 0 and said(bad, "(step 4)") and readable(folder),
        lost,
        "stopped; no diverged checkpoint written",
    )


STRAIGHT: dict[str, Path] = {}


def straight_run(scratch: Path) -> Path:
    """The uninterrupted run the signal cases compare with (run once)."""
    if "folder" not in STRAIGHT:
        STRAIGHT["folder"] = scratch / "straight"
        run(STRAIGHT["folder"], *LONGER)
    return STRAIGHT["folder"]


def stopped_by(signum: signal.Signals) -> Callable[[Path], tuple[bool, bool, str]]:
    def case(folder: Path) -> tuple[bool, bool, str]:
        straight = straight_run(folder.parent)
        process = subprocess.Popen(command(folder, *LONGER), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
        last = folder / "checkpoints" / "last.ckpt"
        while not last.exists() and process.poll() is None:
            time.sleep(0.05)
        time.sleep(1.5)  # into the second epoch
        process.send_signal(signum)
        output = process.communicate(timeout=900)[0].decode()
        saved, status = last_step(folder), job_status(folder)
        rerun = run(folder, *LONGER)
        exact = rerun.returncode == 0 and finished(folder, 32) and same_weights(folder, straight)
        survived = process.returncode == 128 + signum and status == "interrupted" and "saved the state" in output
        return (
            survived and exact,
            not readable(folder),
            f"exit {process.returncode}, last.ckpt saved at step {saved} (16 an epoch), mcl-collect said {status}; "
            f"the rerun resumed there and ended {'bit-identical to' if exact else 'DIFFERENT from'} the "
            "uninterrupted run",
        )

    return case


def full_device(folder: Path) -> tuple[bool, bool, str]:
    with small_mount(folder, "size=60m") as mounted:
        if not mounted:
            return True, False, "not tried: mounting a small tmpfs needs root"
        result = run(folder, "trainer.max_epochs=1")
        status = json.loads((folder / "run.json").read_text())["status"]
        left = [p.name for p in folder.glob("checkpoints/*")]
    named = said(result, "no space left on the device of") and said(result, "MiB free")
    return (
        result.returncode != 0 and named and status == "failed",
        bool(left),
        f"the first checkpoint did not fit in 60 MiB: error names the file and the space free; run.json says "
        f"{status}; files left in checkpoints/: {left or 'none'}",
    )


def read_only_folder(folder: Path) -> tuple[bool, bool, str]:
    with small_mount(folder, "ro,size=1m") as mounted:
        if not mounted:
            return True, False, "not tried: mounting a read-only tmpfs needs root"
        result = run(folder, "trainer.max_epochs=1")
    return (
        result.returncode != 0 and said(result, f"the run folder {folder} cannot be written (Read-only file system)"),
        False,
        "stopped with the folder's name and the cause (not Hydra's logging error)",
    )


def no_readable_image(folder: Path) -> tuple[bool, bool, str]:
    images = folder / "images"
    images.mkdir(parents=True)
    for index in range(4):
        (images / f"{index}.jpg").write_bytes(b"not a jpeg")
    without_data = [o for o in TINY if not o.startswith("data")]
    result = run(folder / "run", "data=folder", f"data.root={images}", base=without_data)
    return (
        result.returncode != 0 and said(result, f"no readable image in {images}: 4 file(s) tried"),
        False,
        "4 corrupt files, batch 16: the error says no image reads, with the causes (not 'lower the batch size')",
    )


def bad_annotations(folder: Path) -> tuple[bool, bool, str]:
    root = folder / "coco"
    for sub in ("annotations", "train", "val"):
        (root / sub).mkdir(parents=True)
    (root / "annotations" / "train.json").write_text('{"images": [')
    (root / "annotations" / "val.json").write_text("{}")
    malformed = run(folder / "a", f"data.root={root}", program="mcl-finetune")
    missing = run(folder / "b", f"data.root={folder / 'elsewhere'}", program="mcl-finetune")
    first = malformed.returncode != 0 and said(malformed, str(root / "annotations" / "train.json"))
    second = missing.returncode != 0 and said(missing, str(folder / "elsewhere" / "annotations" / "train.json"))
    return first and second, False, "mcl-finetune names the malformed file (line, column) and the missing one"


CASES: dict[str, Callable[[Path], tuple[bool, bool, str]]] = {
    "SIGKILL during training, then rerun": kill_during_training,
    "killed while writing a checkpoint, then rerun": kill_during_checkpoint_write,
    "two runs started in one folder": concurrent_runs,
    "finished run rerun": rerun_finished,
    "failing reruns (12 bad values)": failing_rerun,
    "SIGTERM mid-epoch, then rerun": stopped_by(signal.SIGTERM),
    "SIGINT (Ctrl-C) mid-epoch, then rerun": stopped_by(signal.SIGINT),
    "truncated last.ckpt, then rerun": damaged_last_checkpoint,
    "resume with lr=1e12 (diverges)": diverging_resume,
    "device full during the first checkpoint": full_device,
    "read-only run folder": read_only_folder,
    "data=folder with no readable image": no_readable_image,
    "mcl-finetune: malformed / missing annotations": bad_annotations,
}


def main() -> int:
    console = Console(width=120)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, case) in enumerate(CASES.items()):
            console.log(name)
            start = time.perf_counter()
            survived, lost, note = case(Path(scratch) / f"case{index}")
            rows.append((name, survived, lost, note, time.perf_counter() - start))
    table = Table(title="fault cases against mcl-train")
    for column in ("case", "survived", "data lost", "what happened", "s"):
        table.add_column(column)
    for name, survived, lost, note, seconds in rows:
        table.add_row(name, "yes" if survived else "NO", "YES" if lost else "no", note, f"{seconds:.0f}")
    console.print(table)
    survived = sum(r[1] for r in rows)
    lost = sum(r[2] for r in rows)
    console.print(f"{len(rows)} cases tried, {survived} survived, {lost} with data lost")
    lines = ["| case | survived | data lost | what happened |", "| --- | --- | --- | --- |"]
    lines += [f"| {n} | {'yes' if s else 'NO'} | {'YES' if d else 'no'} | {note} |" for n, s, d, note, _ in rows]
    lines.append(f"\n{len(rows)} cases tried, {survived} survived, {lost} with data lost.")
    machine = f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}, as uid {os.geteuid()}"
    lines.append(f"\n`make faults` on {machine}.\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    return 0 if survived == len(rows) and not lost else 1


if __name__ == "__main__":
    raise SystemExit(main())
