"""A run folder owned by one run at a time, with results that are written whole or not at all.

- :class:`RunLock`: ``.mcl-run.lock`` names the process that owns the folder (host, pid, start time, command). A
  second run in the same folder stops with that name; a lock left by a process that no longer exists on this host is
  taken over with a warning.
- :func:`write_json` writes JSON through a temporary file and a rename.
- ``run.json`` records the run's status (``running``, ``finished``, ``failed``, ``interrupted``), the epochs it was
  asked for, and the W&B run id, so that a rerun knows whether there is anything left to do and continues the same W&B
  run.
- :class:`RunLogFile` is the job's log file (``train.log``): what is logged is held back until the run owns its
  folder and has passed its checks (:func:`open_run_logs`), so a rerun that is refused leaves the log as it was.
- :func:`remove_stale_temporaries` deletes the temporary files that a kill during a write leaves behind.
- A write that fails because the device is full says so, naming the file, the space free and the space needed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
LOCK_FILE = ".mcl-run.lock"
STATE_FILE = "run.json"


# The temporary names of replaced_atomically: ".<name>.<pid>.tmp" beside the file they replace.
TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
MIB = 2**20


class RunFolderBusy(RuntimeError):
    """Another live process owns the run folder."""


class NoSpaceLeft(OSError):
    """A write failed because the device holding the file is full."""


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def space_problem(path: Path, temporary: Path, error: OSError | RuntimeError) -> NoSpaceLeft | None:
    """A :class:`NoSpaceLeft` explaining ``error`` when it comes from a full device (``ENOSPC`` or ``EDQUOT``, or a
    library's own I/O error, such as torch's "basic_ios::clear: iostream error", on a device with almost nothing
    free), else ``None``. It names the file, what had been written, what is free and, when ``path`` already exists
    (a checkpoint rewritten every epoch), about how much was needed."""
    if isinstance(error, OSError) and error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    try:
        free = shutil.disk_usage(path.parent).free
        written = temporary.stat().st_size if temporary.exists() else 0
    except OSError:
        return None
    if not isinstance(error, OSError) and free > max(16 * MIB, written // 10):
        return None  # an I/O error on a device with room left: not a full disk
    needed = ""
    if path.exists():
        needed = f"; it needs about {path.stat().st_size / MIB:.1f} MiB (the size of the file it replaces)"
    return NoSpaceLeft(
        errno.ENOSPC,
        f"no space left on the device of {path.parent} while writing {path.name}: {written / MIB:.1f} MiB written, "
        f"{free / MIB:.1f} MiB free{needed}. The previous {path.name} (if any) is unchanged; "
        "free some space (or move the run folder to a larger device) and rerun the same command to resume",
    )


@contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, the file written there is flushed
    to disk and renamed over ``path``. A kill or an error before then leaves ``path`` as it was; a full device raises
    :class:`NoSpaceLeft` (see :func:`space_problem`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        problem = space_problem(path, temporary, error)
        if problem is None:
            raise
        raise problem from error
    finally:
        if temporary.exists():
            # Emptied first: a writer that still holds the file open (torch's, until the error is collected) would
            # otherwise keep its blocks, and the run could not even record that it failed.
            os.truncate(temporary, 0)
            temporary.unlink()


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of :func:`replaced_atomically` left in ``folder`` and its ``checkpoints/`` and
    ``.hydra/`` sub-folders by a process killed while writing (call it while holding the folder's :class:`RunLock`:
    no other run writes there then). Other files are never touched. Returns the files removed."""
    folder = Path(folder)
    removed = []
    for sub in (folder, folder / "checkpoints", folder / ".hydra"):
        if not sub.is_dir():
            continue
        for candidate in sub.iterdir():
            if candidate.is_file() and TEMPORARY_NAME.match(candidate.name):
                candidate.unlink(missing_ok=True)
                removed.append(candidate)
    if removed:
        log.info(
            "removed %d temporary file(s) left by a write that was interrupted: %s",
            len(removed),
            ", ".join(str(p.relative_to(folder)) for p in removed),
        )
    return removed


def write_json(data: Any, path: str | Path) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (:func:`replaced_atomically`)."""
    with replaced_atomically(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return Path(path)


def read_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when the file is missing or unreadable (a run that never finished)."""
    try:
        data = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unwritable(folder: Path, error: OSError) -> OSError:
    """The error for a run folder that cannot be written (read-only, not ours, full)."""
    return type(error)(
        error.errno,
        f"the run folder {folder} cannot be written ({error.strerror}): a run keeps its config, logs, checkpoints and "
        "metrics there. Give it a folder you can write to (hydra.run.dir=..., or hydra.sweep.dir=... with --multirun), "
        "or fix the folder's permissions",
    )


class RunLock:
    """Exclusive ownership of a run folder for the lifetime of a ``with`` block (see the module docstring)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_FILE
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        self.held = False

    def _create(self) -> bool:
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as error:
            raise unwritable(self.path.parent, error) from error
        with os.fdopen(descriptor, "w") as file:
            json.dump(self.holder, file)
        return True

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise unwritable(self.path.parent, error) from error
        if self._create():
            self.held = True
            return self
        owner = read_json(self.path)
        same_host = owner.get("host") == self.holder["host"]
        if owner and same_host and isinstance(owner.get("pid"), int) and not process_alive(owner["pid"]):
            log.warning(
                "taking over %s: it was left by process %s (started %s), which no longer runs",
                self.path,
                owner["pid"],
                owner.get("started"),
            )
            self.path.unlink(missing_ok=True)
            if self._create():
                self.held = True
                return self
            owner = read_json(self.path)
        raise RunFolderBusy(
            f"the run folder {self.path.parent} is in use by process {owner.get('pid')} on {owner.get('host')} "
            f"(started {owner.get('started')}: {owner.get('command')}). Give this run its own folder "
            f"(hydra.run.dir=...) or wait for that one; if it is gone, delete {self.path}."
        )

    def release(self) -> None:
        if self.held and read_json(self.path).get("pid") == self.holder["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunLogFile(logging.Handler):
    """The job's log file (Hydra's ``<run folder>/<job>.log``), opened only when the run owns its folder.

    Hydra opens its log file when the job starts, before any check has run: a rerun refused by its checks would
    append its error to the log of the run the folder holds, and a folder that cannot be written fails in Hydra's
    logging set-up with a message that names no folder. This handler (``conf/hydra/default.yaml`` puts it in place
    of Hydra's) keeps the formatted lines in memory until :func:`open_run_logs` is called, then writes them and every
    later line to ``filename``. A run that never opens it (refused, or stopped by a bad value) leaves no trace in the
    folder; its messages went to the console.
    """

    def __init__(self, filename: str | Path, mode: str = "a", encoding: str | None = "utf-8", delay: bool = True):
        super().__init__()
        self.filename = Path(filename)
        self.mode = mode
        self.encoding = encoding
        self.lines: list[str] = []
        self.stream: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if self.stream is None:
                self.lines.append(line)
                return
            self.stream.write(line + "\n")
            self.stream.flush()
        except Exception:  # a logging handler never raises into the code that logs
            self.handleError(record)

    def open(self) -> None:
        """Start writing to the file: the lines held back first."""
        if self.stream is not None:
            return
        self.acquire()
        try:
            self.filename.parent.mkdir(parents=True, exist_ok=True)
            self.stream = open(self.filename, self.mode, encoding=self.encoding)  # noqa: SIM115 (closed by close())
            self.stream.write("".join(line + "\n" for line in self.lines))
            self.stream.flush()
            self.lines = []
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
                self.stream = None
        finally:
            self.release()
        super().close()


def open_run_logs() -> list[Path]:
    """Open the :class:`RunLogFile` handlers of the root logger (the job's log file); returns their files."""
    opened = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogFile):
            handler.open()
            opened.append(handler.filename)
    return opened
