"""Fault cases against ``mcl-train``: kills during training and during a checkpoint write, concurrent runs, reruns,
a damaged ``last.ckpt`` and a diverging resume. Prints how many survived and whether any result was lost.

``make faults`` (``.venv/bin/python benchmarks/faults.py``); writes ``benchmarks/results/faults.md``. Each case runs
tiny synthetic jobs in a temporary folder (about 6 minutes in all on 2 CPU cores).
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
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mcl.checkpoints import CheckpointError, load_checkpoint

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


def command(folder: Path, *overrides: str) -> list[str]:
    return [str(Path(sys.executable).parent / "mcl-train"), *TINY, f"hydra.run.dir={folder}", *overrides]


def run(folder: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(command(folder, *overrides), capture_output=True, text=True, timeout=900, env=env)


def said(result: subprocess.CompletedProcess, text: str) -> bool:
    """Whether a run printed ``text`` (Hydra sends log lines to stdout and errors to stderr)."""
    return text in result.stdout + result.stderr


def digest(folder: Path) -> dict[str, str]:
    """Content hashes of the results a run leaves: metrics, run state and checkpoints."""
    files = [*folder.glob("*.json"), *folder.glob("checkpoints/*.ckpt"), *folder.glob(".hydra/*.yaml")]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


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
    rerun = run(folder, "trainer.max_epochs=3")
    return (
        rerun.returncode == 0 and finished(folder, 12),
        saved > 12 or not readable(folder),
        f"killed at step >= {saved}; rerun resumed to 12",
    )


def kill_during_checkpoint_write(folder: Path) -> tuple[bool, bool, str]:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    died = subprocess.run(
        [sys.executable, "-c", DIE_IN_SECOND_SAVE, *command(folder, "trainer.max_epochs=3")[1:]],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    try:
        intact, lost = last_step(folder), False  # the file of the first save, whole
    except CheckpointError:
        intact, lost = None, True
    rerun = run(folder, "trainer.max_epochs=3")
    survived = died.returncode == 137 and rerun.returncode == 0 and finished(folder, 12)
    return survived, lost, f"last.ckpt stayed at step {intact}; rerun resumed to 12"


def concurrent_runs(folder: Path) -> tuple[bool, bool, str]:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    first = subprocess.Popen(
        command(folder, "seed=1", "trainer.max_epochs=1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lock = folder / ".mcl-run.lock"
    while not lock.exists() and first.poll() is None:
        time.sleep(0.1)
    second = run(folder, "seed=2", "trainer.max_epochs=1")
    first.communicate(timeout=900)
    refused = second.returncode != 0 and said(second, "in use by process")
    config = (folder / ".hydra" / "config.yaml").read_text()
    seed_ok = "seed: 1" in config
    return (
        refused and first.returncode == 0 and finished(folder, 4),
        not seed_ok,
        "second run refused, naming the first",
    )


def rerun_finished(folder: Path) -> tuple[bool, bool, str]:
    run(folder, "trainer.max_epochs=1")
    before = digest(folder)
    again = run(folder, "trainer.max_epochs=1")
    return (
        again.returncode == 0 and said(again, "already holds a finished run"),
        digest(folder) != before,
        "nothing rewritten",
    )


def failing_rerun(folder: Path) -> tuple[bool, bool, str]:
    run(folder, "trainer.max_epochs=1")
    before = digest(folder)
    bad = run(folder, "levels=5", "trainer.max_epochs=2")
    return (
        bad.returncode != 0 and said(bad, "levels=5"),
        digest(folder) != before,
        "error names the key; files unchanged",
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


CASES: dict[str, Callable[[Path], tuple[bool, bool, str]]] = {
    "SIGKILL during training, then rerun": kill_during_training,
    "killed while writing a checkpoint, then rerun": kill_during_checkpoint_write,
    "two runs started in one folder": concurrent_runs,
    "finished run rerun": rerun_finished,
    "failing rerun (levels=5)": failing_rerun,
    "truncated last.ckpt, then rerun": damaged_last_checkpoint,
    "resume with lr=1e12 (diverges)": diverging_resume,
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
    lines.append(f"\n{len(rows)} cases tried, {survived} survived, {lost} with data lost.\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    return 0 if survived == len(rows) and not lost else 1


if __name__ == "__main__":
    raise SystemExit(main())
