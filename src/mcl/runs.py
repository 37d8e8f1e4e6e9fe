"""A run folder owned by one run at a time, with results that are written whole or not at all.

- :class:`RunLock`: ``.mcl-run.lock`` names the process that owns the folder (host, pid, start time, command). A
  second run in the same folder stops with that name; a lock left by a process that no longer exists on this host is
  taken over with a warning.
- :func:`write_json` writes JSON through a temporary file and a rename.
- ``run.json`` records the run's status (``running``, ``finished``, ``failed``), the epochs it was asked for, and
  the W&B run id, so that a rerun knows whether there is anything left to do and continues the same W&B run.
"""

from __future__ import annotations

import json
import logging
import os
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


class RunFolderBusy(RuntimeError):
    """Another live process owns the run folder."""


@contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, the file written there is flushed
    to disk and renamed over ``path``. A kill or an error before then leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


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
        with os.fdopen(descriptor, "w") as file:
            json.dump(self.holder, file)
        return True

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
