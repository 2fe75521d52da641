"""Refusing bad input before the work starts: one exception type and the checks several commands share.

Every check here raises :class:`InputError` with one sentence that names the input and says what to do;
the CLI prints it as ``error: ...`` (it is a ``ValueError``), notebooks see the same sentence.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
