"""Timing hooks: ``fit`` reports how long each of its phases takes to a :data:`PhaseTimer` it is given,
so a benchmark measures phases through an argument instead of patching functions by name."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable, ContextManager, Iterator

# Called with a phase's name around each time the phase runs: "model build", "BatchNorm statistics",
# "train", "validate", "checkpoint save", "checkpoint wait", "best.pt reload".
PhaseTimer = Callable[[str], ContextManager[None]]


def no_timing(name: str) -> ContextManager[None]:
    """The default :data:`PhaseTimer`: measures nothing."""
    return contextlib.nullcontext()


class PhaseTimes:
    """A :data:`PhaseTimer` that keeps the wall seconds of every run of each phase, in order, in ``spent``."""

    def __init__(self) -> None:
        self.spent: dict[str, list[float]] = defaultdict(list)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.spent[name].append(time.perf_counter() - started)
