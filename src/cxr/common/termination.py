"""SIGTERM (``kill PID``, a job scheduler's stop, ``docker stop``) handled like Ctrl-C: Python's default for
it ends the process at once, without the message, the resumable checkpoint's confirmation or the removal of
``run.lock`` that Ctrl-C's KeyboardInterrupt gets. While :func:`sigterm_as_interrupt` runs, SIGTERM raises
:class:`Terminated`, a KeyboardInterrupt, so every ``except KeyboardInterrupt`` and ``finally`` runs."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised where Ctrl-C would raise KeyboardInterrupt."""


@dataclass
class Received:
    """Whether SIGTERM arrived while the block ran."""

    sigterm: bool = False


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[Received]:
    """Turn SIGTERM into :class:`Terminated` while the block runs. Only in the main thread and only where
    SIGTERM still has its default action (an application embedding cxr keeps its own handler). A second
    SIGTERM while the first one's cleanup runs is ignored, so the cleanup finishes."""
    received = Received()
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield received
        return

    def stop(signum: int, frame: object) -> None:
        if received.sigterm:
            return
        received.sigterm = True
        print("\nSIGTERM received: stopping as for Ctrl-C.", file=sys.stderr, flush=True)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
