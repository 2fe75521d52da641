"""Folders of labelled images added to training (``cxr train --add-train DIR``) and the part of each one held
out by group to be scored as an external folder of the same run (``--add-train-holdout FRACTION``).

In this dataset the class is also the source and the patient's age; the one fix measured to work is data
(adults from another hospital in the training split). This module holds what needs neither torch nor pixels,
so the CLI refuses bad input in one line before the heavy imports: the options, the checks, the class folders
of an added folder (named as external folders are, :func:`cxr.data.layout.class_of`), the seeded group-wise holdout
and the sentence the model card and README print. :mod:`cxr.train.added_training` scans, audits and merges.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cxr.data.groups import GroupsError, read_groups
from cxr.data.imageio import IMAGE_EXTENSIONS
from cxr.data.layout import CLASSES, class_of
from cxr.common.inputs import InputError, require

EXPECTED = ("expected class folders named (in any case) COVID19 (or COVID-19, COVID), NORMAL, PNEUMONIA and "
            "TUBERCULOSIS (or TB), any of them, directly in the folder")
HOLDOUT_SUFFIX = "-holdout"


@dataclass(frozen=True)
class AddedFolders:
    """What ``--add-train`` and its companion flags ask for. ``groups``: one CSV for every folder or one per
    folder (without one, each image is its own group); ``holdout_only``: score the held-out part but add
    nothing to training (the control run of a comparison)."""

    folders: tuple[Path, ...]
    holdout: float | None = None
    groups: tuple[Path, ...] = ()
    group_column: str = "group"
    drop_duplicates: bool = False
    holdout_only: bool = False

    def __post_init__(self) -> None:  # paths given as strings, lists given for tuples
        object.__setattr__(self, "folders", tuple(Path(folder) for folder in self.folders))
        object.__setattr__(self, "groups", tuple(Path(csv) for csv in self.groups))

    @classmethod
    def of(cls, value: AddedFolders | Sequence[str | os.PathLike] | None) -> AddedFolders | None:
        """The options from a list of folders (the notebooks' ``CXR_ADD_TRAIN``), as given, or None."""
        if value is None or isinstance(value, AddedFolders):
            return value
        return cls(tuple(Path(folder) for folder in value)) if value else None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AddedFolders | None:
        """The options of ``cxr train`` (None when none of them is given)."""
        if not (args.add_train or args.add_train_holdout is not None or args.groups or args.add_train_holdout_only):
            return None
        return cls(tuple(map(Path, args.add_train or ())), args.add_train_holdout, tuple(map(Path, args.groups or ())),
                   args.group_column, args.add_train_drop_duplicates, args.add_train_holdout_only)

    def groups_csv(self, index: int) -> Path | None:
        return self.groups[index if len(self.groups) > 1 else 0] if self.groups else None


def folders_from_env(text: str | None) -> list[Path]:
    """Folders listed in an environment variable, separated by ``os.pathsep`` (``:``, on Windows ``;``)."""
    return [Path(part).expanduser() for part in (text or "").split(os.pathsep) if part.strip()]


def holdout_name(folder: Path) -> str:
    """The name under ``external/`` of a folder's held-out part."""
    return Path(folder).resolve().name + HOLDOUT_SUFFIX


def class_folders(folder: Path) -> dict[str, list[Path]]:
    """The class folders directly in an added folder, by class; any other subfolder is refused (its images
    would silently train as nothing), and so is a folder without any."""
    require(folder.is_dir(), f"--add-train {str(folder)!r} does not exist or is not a folder.")
    found: dict[str, list[Path]] = {}
    unknown = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = class_of(child.name)
        if label is None:
            unknown.append(child.name)
        else:
            found.setdefault(label, []).append(child)
    require(not unknown, f"--add-train {str(folder)!r}: folder(s) {', '.join(unknown)} name no class; {EXPECTED}.")
    require(bool(found), f"--add-train {str(folder)!r} holds no class folder; {EXPECTED}.")
    return found


def image_files(folder: Path) -> list[Path]:
    """The files with an image extension directly in the folder's class folders (not yet checked)."""
    return sorted(p for folders in class_folders(folder).values() for f in folders for p in f.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _nested(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_added(added: AddedFolders | None, external: Sequence[str | os.PathLike] = (), seed: int = 42) -> None:
    """Refuse, in one line, what cannot work, before any image is decoded: flags without ``--add-train``, a
    holdout outside (0, 1), a missing, empty or misnamed folder, a folder also given as ``--external``, a
    groups CSV that does not cover the images, and a holdout that leaves no group on one side."""
    for folder in map(Path, external):
        require(folder.is_dir(), f"--external {str(folder)!r} does not exist or is not a folder.")
    if added is None or not added.folders:
        require(added is None or (added.holdout is None and not added.groups and not added.holdout_only),
                "--add-train-holdout, --groups and --add-train-holdout-only need --add-train DIR.")
        return
    if added.holdout is not None:
        require(0 < added.holdout < 1, f"--add-train-holdout {added.holdout} is outside (0, 1): it is the share of "
                                       "each added folder's groups kept out of training, e.g. 0.5.")
    require(added.holdout is not None or not (added.groups or added.holdout_only),
            "--groups and --add-train-holdout-only only serve --add-train-holdout FRACTION; give it too.")
    require(len(added.groups) in (0, 1, len(added.folders)),
            f"--groups: give one CSV for all {len(added.folders)} added folders or one per folder, "
            f"not {len(added.groups)}.")
    for index, folder in enumerate(added.folders):
        files = image_files(folder)
        require(bool(files), f"--add-train {str(folder)!r} is empty: its class folders hold no image file.")
        for other in added.folders[:index]:
            require(not _nested(folder, other), f"--add-train {str(folder)!r} and {str(other)!r} overlap; give "
                                                "each folder once.")
        for other in map(Path, external):
            require(not _nested(folder, other), f"{str(folder)!r} is given both as --add-train and as --external "
                                                f"({str(other)!r}): a model cannot be scored on what it trained on.")
        if added.holdout is not None:
            holdout_mask(group_of_each(files, folder, added, index), added.holdout, seed, folder)


def group_of_each(paths: Sequence[Path], folder: Path, added: AddedFolders, index: int) -> list[str]:
    """Each image's group: from the folder's groups CSV, else the image itself (its path in the folder)."""
    csv_path = added.groups_csv(index)
    if csv_path is None:
        return [Path(p).relative_to(folder).as_posix() for p in paths]
    try:
        return read_groups(csv_path, added.group_column, paths, folder, min_groups=1)
    except GroupsError as error:
        raise InputError(f"--groups: {error}") from None


def holdout_mask(groups: Sequence[str], fraction: float, seed: int, folder: Path) -> np.ndarray:
    """True for the images whose group is held out: ``ceil(fraction * groups)`` groups drawn with ``seed``
    (scikit-learn's GroupShuffleSplit), so every image of a group sits on one side."""
    count = len(set(groups))
    held = math.ceil(fraction * count - 1e-9)
    require(0 < held < count, f"--add-train-holdout {fraction} of the {count} group(s) in {str(folder)!r} leaves "
                              f"{'none' if held >= count else 'all'} for training; the held-out and the training "
                              "part each need at least one group.")
    from sklearn.model_selection import GroupShuffleSplit  # only here: it takes a second to import

    split = GroupShuffleSplit(n_splits=1, test_size=held, train_size=count - held, random_state=seed)
    _, held_out = next(split.split(np.zeros(len(groups)), groups=list(groups)))
    mask = np.zeros(len(groups), dtype=bool)
    mask[held_out] = True
    return mask


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {counts[name]}" for name in CLASSES if counts.get(name)) or "none"


def added_sentence(record: dict[str, Any] | None) -> str | None:
    """What a run added to its training split and held out, in one sentence for the model card and README;
    None when no folder was added."""
    if not record or not record.get("folders"):
        return None
    parts = []
    for folder in record["folders"]:
        notes = [] if record.get("holdout_only") else [f"{_counts(folder['added'])} added"]
        if folder.get("held_out"):
            groups = folder["groups"]
            by = f"groups by `{groups['column']}`" if groups["column"] else "images"
            notes.append(f"{_counts(folder['held_out'])} held out ({groups['held_out']} of "
                         f"{groups['held_out'] + groups['training']} {by}), scored as the external folder "
                         f"`{folder['held_out_as']}`")
        if folder.get("dropped_duplicates"):
            notes.append(f"{len(folder['dropped_duplicates'])} duplicate(s) of test or external images left out")
        parts.append(f"`{folder['folder']}` ({'; '.join(notes)})")
    lead = ("Control run, nothing added to training:" if record.get("holdout_only") else
            f"{record['images']} images from other folders added to the training split (never to validation or test):")
    return f"{lead} {', '.join(parts)}."
