"""Refusing what a user gave, in one sentence: the exception type every command raises for a bad argument,
file or folder (:class:`InputError`, a ``ValueError`` the CLI prints as one ``error:`` line, notebooks see the
same sentence) and the checks of paths that commands at every layer share. Nothing here imports torch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SMALLEST_IMAGE = 32  # a ResNet's stride: below it the last stage sees less than one pixel
LARGEST_IMAGE = 1024  # the decoded-image cache holds squares of 8/7 of this side: 1.3 MB per image


class InputError(ValueError):
    """An argument, file or folder that cannot be used; the message names it and says why."""


def require(condition: bool, message: str) -> None:
    """Refuse with ``message`` unless ``condition`` holds."""
    if not condition:
        raise InputError(message)


def writable_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a folder this process can write into, created if missing; ``what`` names it in the
    message (e.g. ``--out``). Checked before any work, so a read-only or mistyped output never costs a run."""
    path = Path(path)
    require(not path.exists() or path.is_dir(), f"{what} {str(path)!r} is a file, not a folder; give a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise InputError(f"cannot write into {what} {str(path)!r} ({error.strerror or error}); "
                         "choose a folder you can write to.") from None
    return path


def writable_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a file that can be written later: not a folder, in a folder that can be written."""
    path = Path(path)
    require(not path.is_dir(), f"{what} {str(path)!r} is a folder, not a file name.")
    writable_folder(path.parent, f"the folder of {what}")
    return path


def not_an_input(path: str | os.PathLike, inputs: "list[Path] | tuple[str, ...]", flag: str) -> None:
    """Refuse an output file that is one of the inputs (``cxr predict a.png --csv a.png``): it would be overwritten."""
    target = Path(path).expanduser().resolve()
    require(target not in {Path(p).expanduser().resolve() for p in inputs},
            f"{flag} {str(path)!r} is one of the input files; writing there would overwrite it. Give another file name.")
