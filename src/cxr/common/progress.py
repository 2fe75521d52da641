"""Progress bars that show where they are watched: widgets in Jupyter, text on a terminal, and text lines in a
notebook run from a terminal by papermill, whose log shows a widget only as its first frame ("0%")."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from tqdm import std
from tqdm.auto import tqdm as auto_tqdm

TEXT_INTERVAL_S = 10.0  # papermill logs every refresh as a line: one every ten seconds is enough to see it move


@functools.cache
def text_in_notebook() -> bool:
    """True when bars must be text although a notebook kernel runs: ``CXR_PROGRESS=text``, or a kernel started
    by papermill (its parent process), which has no widget frontend."""
    chosen = os.environ.get("CXR_PROGRESS", "").strip().lower()
    if chosen in ("text", "widget"):
        return chosen == "text"
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:  # not Linux, or no /proc: widgets as usual
        return False
    return any(Path(part.decode(errors="replace")).name == "papermill" for part in parent[:3])


def tqdm(*args: Any, **kwargs: Any) -> std.tqdm:
    """``tqdm.auto.tqdm``, or a text bar refreshed every ten seconds where :func:`text_in_notebook` says so."""
    if auto_tqdm is std.tqdm or not text_in_notebook():
        return auto_tqdm(*args, **kwargs)
    kwargs.setdefault("mininterval", TEXT_INTERVAL_S)
    return std.tqdm(*args, **kwargs)
