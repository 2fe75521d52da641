"""Saving a figure without risking the scores: a figure that cannot be written (a full disk, a file system
gone read-only) is reported in one warning line and listed, and the run goes on to write its metrics.json,
which is small and holds what the figures only show. Every figure file of the package goes through
:func:`save_figure`."""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

_UNWRITTEN: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("unwritten_figures", default=None)


class FigureNotWritten(UserWarning):
    """A figure file could not be written; the numbers it shows are kept elsewhere."""


def save_figure(figure: Any, path: str | os.PathLike, **options: Any) -> bool:
    """``figure.savefig(path, **options)``; on an OSError the partial file is removed, a one-line warning
    names the figure and the reason, and False is returned (the name is listed by :func:`unwritten_figures`)."""
    path = Path(path)
    try:
        figure.savefig(path, **options)
        return True
    except OSError as error:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        listed = _UNWRITTEN.get()
        if listed is not None:
            listed.append(path.name)
        warnings.warn(f"figure {str(path)!r} could not be written ({error.strerror or error}); the scores it "
                      "shows are kept in the run's JSON files.", FigureNotWritten, stacklevel=2)
        return False


@contextlib.contextmanager
def unwritten_figures() -> Iterator[list[str]]:
    """The names of the figures :func:`save_figure` could not write while the block ran."""
    names: list[str] = []
    token = _UNWRITTEN.set(names)
    try:
        yield names
    finally:
        _UNWRITTEN.reset(token)
