"""Which group each image belongs to, read from a CSV (a patient, a hospital, a source collection).

Two jobs need it: subgroup scores (``cxr evaluate --groups CSV --group-column source_repo``: is the score
the same in every source, or does one hide a failure? Oakden-Rayner et al., 2020), and splits that keep
every image of one group on one side (``--add-train-holdout``: a patient's second film must not sit in
training while the first is scored). The CSV names each image by its path relative to a folder (the data
folder, or the added folder) or by its bare file name; the sample's and the NIH folder's ``manifest.csv``
use a ``file`` column and carry ``source_repo`` and ``group`` (one patient) columns.
Plain csv and pathlib only: no torch, so a bad CSV is refused at once.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

FILE_COLUMNS = ("file", "path", "image", "filename")


class GroupsError(ValueError):
    """The groups CSV cannot be used; the message names the file, column or images at fault."""


def _read_rows(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not csv_path.is_file():
        raise GroupsError(f"groups CSV {str(csv_path)!r} does not exist or is not a file")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except (UnicodeDecodeError, csv.Error) as error:
        raise GroupsError(f"groups CSV {str(csv_path)!r} is not a readable UTF-8 CSV ({error})") from None


def _file_column(csv_path: Path, columns: list[str]) -> str:
    for name in FILE_COLUMNS:
        if name in columns:
            return name
    raise GroupsError(f"groups CSV {str(csv_path)!r} has no column naming the images (one of "
                      f"{', '.join(FILE_COLUMNS)}); its columns: {', '.join(columns) or 'none'}")


def _shown(names: Sequence[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def check_groups_csv(csv_path: str | os.PathLike, column: str) -> None:
    """Refuse, in one line, a groups CSV that cannot serve whatever the images: missing, unreadable, no
    column naming the images, no ``column``. Cheap: for a command to check before it loads a model."""
    columns, _ = _read_rows(Path(csv_path))
    _file_column(Path(csv_path), columns)
    if column not in columns:
        raise GroupsError(f"groups CSV {str(csv_path)!r} has no column {column!r}; its columns: {', '.join(columns)}")


def read_groups(csv_path: str | os.PathLike, column: str, paths: Sequence[Path], root: Path,
                min_groups: int = 2) -> list[str]:
    """The group of each of ``paths`` (images under ``root``), in their order.

    An image is found by its path relative to ``root`` (``/`` separators), else by its file name when that
    name is unique in the CSV. Refused, in one line: a missing CSV or column, images the CSV does not list
    (named), an empty group value, and fewer than ``min_groups`` groups among ``paths``.
    """
    csv_path = Path(csv_path)
    columns, rows = _read_rows(csv_path)
    file_column = _file_column(csv_path, columns)
    if column not in columns:
        raise GroupsError(f"groups CSV {str(csv_path)!r} has no column {column!r}; its columns: {', '.join(columns)}")
    by_path = {row[file_column].replace("\\", "/").strip("/"): row[column] for row in rows if row.get(file_column)}
    name_counts = Counter(Path(key).name for key in by_path)
    by_name = {Path(key).name: value for key, value in by_path.items() if name_counts[Path(key).name] == 1}
    groups, missing = [], []
    for path in paths:
        try:
            relative = Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            relative = Path(path).name
        group = by_path.get(relative, by_name.get(Path(path).name))
        if group is None or not group.strip():
            missing.append(relative)
        groups.append((group or "").strip())
    if missing:
        raise GroupsError(f"groups CSV {str(csv_path)!r} gives no {column!r} for {len(missing)} of {len(paths)} "
                          f"images: {_shown(missing)}")
    found = len(set(groups))
    if found < min_groups:
        raise GroupsError(f"groups CSV {str(csv_path)!r}: column {column!r} puts all {len(paths)} images in "
                          f"{found} group{'s' if found != 1 else ''} ({_shown(sorted(set(groups)))}); "
                          f"at least {min_groups} are needed")
    return groups
