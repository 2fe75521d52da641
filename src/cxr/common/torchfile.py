"""What is wrong with a file given as a ``torch.save`` file, found before ``torch.load`` inflates or unpickles
anything: a truncated file, a zip bomb, and (after the safe load refused it) a pickle of other objects, each
said in a few words for one line naming the file."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

# How every torch.save file starts: a zip archive, or the pickle protocol opcode of the legacy format.
TORCH_MAGIC = (b"PK", b"\x80\x02")


def archive_problem(path: str | os.PathLike) -> str | None:
    """Why the zip archive ``torch.save`` writes cannot be loaded safely, from its central directory alone
    (nothing inflated), or None. ``torch.save`` stores every record uncompressed, so records that inflate to
    more than the file holds are a zip bomb (one 98 MB file inflated to 4 GiB before its refusal)."""
    path = Path(path)
    with open(path, "rb") as handle:
        magic = handle.read(2)
    if magic == b"":
        return "is empty"
    if magic not in TORCH_MAGIC:  # torch would blame its weights_only default
        return "is not a file written by torch.save"
    if magic != b"PK":
        return None  # the legacy pickle format: torch.load's own errors say what is wrong
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "is truncated or damaged (its zip directory, at the end of the file, is missing)"
    if any(record.header_offset + record.compress_size > size for record in records):
        return "is truncated (its records run past the end of the file)"
    inflated = sum(record.file_size for record in records)
    if inflated > size:
        return (f"holds records that would inflate to {inflated / 2**20:,.0f} MB from a {size / 2**20:,.1f} MB "
                "file (torch.save never compresses), so it was refused before inflating them")
    return None


def load_problem(error: BaseException) -> str:
    """A ``torch.load(..., weights_only=True)`` failure in a few words: truncated, or a pickle holding other
    objects than tensors and plain data (refused, never run), else the error's first line."""
    text = str(error).strip()
    if isinstance(error, EOFError) or "truncated" in text.lower() or "ran out of input" in text.lower():
        return "is truncated (it ends before its data does)"
    if isinstance(error, pickle.UnpicklingError) and "weights only load failed" in text.lower():
        found = re.search(r"Unsupported [^\n]*?(?=\. |\n|$)", text)
        what = f"; {found.group(0)}" if found else ""
        return (f"holds objects other than tensors and plain data{what}; it was refused for safety, without "
                "running them")
    first = text.splitlines()[0] if text else "no data"
    return f"cannot be read ({type(error).__name__}: {first})"
