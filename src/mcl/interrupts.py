"""Stopping a run on request: SIGTERM (a scheduler's pre-emption, ``kill``) or SIGINT (Ctrl-C) saves the training
state at the next step boundary and exits non-zero.

Lightning turns SIGTERM into a ``SIGTERMException`` (a ``SystemExit`` whose status is 0) raised between two steps,
on every rank at the same step (rank 0 broadcasts it); the run's :class:`~mcl.checkpoints.LastCheckpoint` writes
``last.ckpt`` there, so a rerun resumes from the step the signal interrupted.
:class:`Interruptions` routes SIGINT the same way (a first Ctrl-C stops at the next step boundary, a second stops at
once), stops a run that is not inside a Trainer call at once, and remembers the signal, so that
:func:`mcl.train.train` records the run as ``interrupted`` and exits with ``128 + signal`` (143 for SIGTERM, 130 for
SIGINT): a scheduler or a ``&&`` chain sees that the run did not finish. Lightning's SLURM requeue signal (SIGUSR1)
is left to Lightning.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(SystemExit):
    """The run stopped for a signal; its exit status is ``128 + signum``."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class Interruptions:
    """SIGTERM and SIGINT handlers for the lifetime of a ``with`` block (the main thread only; elsewhere a no-op).

    Inside :meth:`trainer_call` Lightning's SIGTERM handler decides when to stop (the next step boundary), and SIGINT
    is passed on to it as SIGTERM; outside, either signal stops the run at once with :class:`RunInterrupted`.
    ``received`` is the first signal received, or ``None``.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.in_trainer = False
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C
                raise RunInterrupted(self.received)
            return  # the SIGTERM passed on to Lightning below, or a repeated one
        self.received = signum
        if not self.in_trainer:
            raise RunInterrupted(signum)
        log.warning(
            "received %s: stopping after this step, once it is saved (Ctrl-C again stops at once, without saving)",
            signal.Signals(signum).name,
        )
        if signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's SIGTERM path: every rank stops at the same step

    @contextmanager
    def trainer_call(self) -> Iterator[None]:
        """Around ``trainer.fit`` / ``trainer.validate``: Lightning's loops stop at a step boundary."""
        self.in_trainer = True
        try:
            yield
        finally:
            self.in_trainer = False

    def __enter__(self) -> Interruptions:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def exit_for(self, error: BaseException) -> RunInterrupted | None:
        """The :class:`RunInterrupted` to stop with when ``error`` is an interruption (Lightning's
        ``SIGTERMException``, ours, or a ``KeyboardInterrupt``), else ``None``."""
        if isinstance(error, RunInterrupted):
            return error
        if isinstance(error, SIGTERMException):
            return RunInterrupted(self.received or signal.SIGTERM)
        if isinstance(error, KeyboardInterrupt):
            return RunInterrupted(signal.SIGINT)
        return None
