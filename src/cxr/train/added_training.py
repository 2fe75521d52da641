"""The training split with images added from other folders (``cxr train --add-train DIR``), audited first.

Each added folder is scanned like a dataset split (unusable files skipped and listed), a seeded share of its
groups is held out (:func:`cxr.data.added_folders.holdout_mask`) to be scored as an external folder after training,
and the rest joins the training split only: validation and test stay the dataset's own, so the scores remain
comparable, and the class weights follow the final training split (the engine computes them from it). Before
anything trains, the images to add are audited (exact and near duplicates, :mod:`cxr.audit.data_audit`) against the test
split, every external folder of the run and every held-out part: a copy there would be scored after being
trained on. Such images are refused by name, or dropped and listed with ``drop_duplicates``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cxr.data.added_folders import AddedFolders, class_folders, group_of_each, holdout_mask, holdout_name
from cxr.audit.data_audit import audit_splits
from cxr.data.dataset import DataSplits, Split, add_class_files, scan_external, warn_skipped
from cxr.common.inputs import InputError
from cxr.data.layout import CLASSES, relative_path

ADDED = "added"
SHOWN = 10


@dataclass
class AddedTraining:
    """The splits a run trains on (``splits.added`` records what was added) and the folders it scores after
    training: each held-out part ``(name under external/, folder, images)`` and the ``--external`` folders."""

    splits: DataSplits
    holdouts: list[tuple[str, Path, Split]]
    externals: list[Path]


def scan_added(folder: Path) -> Split:
    """The usable images of an added folder's class folders, with their labels."""
    found = class_folders(folder)
    split = Split([], [])
    for label, name in enumerate(CLASSES):
        add_class_files(split, found.get(name, []), label)
    warn_skipped(split.skipped)
    if not split.paths:
        raise InputError(f"--add-train {str(folder)!r} is empty: none of its image files could be used.")
    return split


def _split_folder(folder: Path, added: AddedFolders, index: int, seed: int) -> tuple[Split, Split, dict[str, Any]]:
    """(training part, held-out part, what the record says of the folder's groups and skipped files)."""
    images = scan_added(folder)
    skipped = [{"path": str(p), "reason": why} for p, why in images.skipped]
    if added.holdout is None:
        groups = {"csv": None, "column": None, "training": len(images), "held_out": 0}
        return images, Split([], []), {"groups": groups, "skipped_files": skipped}
    group = group_of_each(images.paths, folder, added, index)
    held = holdout_mask(group, added.holdout, seed, folder)
    groups = {"csv": str(added.groups_csv(index)) if added.groups else None,
              "column": added.group_column if added.groups else None,
              "training": len({g for g, h in zip(group, held) if not h}),
              "held_out": len({g for g, h in zip(group, held) if h})}
    return (images.subset(np.flatnonzero(~held)), images.subset(np.flatnonzero(held)),
            {"groups": groups, "skipped_files": skipped})


def duplicates_of(report: dict[str, Any]) -> dict[str, list[str]]:
    """``{added file: [other split: file, ...]}`` for every added image that shows the same picture (exact or
    near copy) as an image of another audited split."""
    found: dict[str, list[str]] = {}
    for group in report["duplicates"]["groups"] + report["near_duplicates"]["groups"]:
        others = [f"{f['split']}: {f['path']}" for f in group["files"] if f["split"] != ADDED]
        for file in group["files"]:
            if file["split"] == ADDED and others:
                found.setdefault(file["path"], [])
                found[file["path"]] += [o for o in others if o not in found[file["path"]]]
    return dict(sorted(found.items()))


def _listed(duplicates: dict[str, list[str]]) -> str:
    shown = [f"{path} = {'; '.join(same)}" for path, same in list(duplicates.items())[:SHOWN]]
    more = f" and {len(duplicates) - SHOWN} more" if len(duplicates) > SHOWN else ""
    return ", ".join(shown) + more


def audit_added(splits: DataSplits, added: Split, against: dict[str, Split], drop: bool, progress: bool,
                cache_dir: str | os.PathLike | None) -> tuple[Split, dict[str, list[str]]]:
    """The added images without the duplicates of ``against`` (the test split, external folders and held-out
    parts) when ``drop``, else refused naming them; also returns the duplicates found."""
    report = audit_splits({**against, ADDED: added}, splits.root, progress, {"source": "added training images"},
                          cache_dir)
    duplicates = duplicates_of(report)
    if duplicates and not drop:
        raise InputError(f"{len(duplicates)} added training image(s) show the same picture as test or external "
                         f"images, which would then be scored after training on them: {_listed(duplicates)}. "
                         "Remove them, or pass --add-train-drop-duplicates to leave them out.")
    if duplicates:
        warnings.warn(f"Left out of training {len(duplicates)} added image(s) that duplicate test or external "
                      f"images: {_listed(duplicates)}.", stacklevel=3)
    kept = [k for k, path in enumerate(added.paths) if relative_path(path, splits.root) not in duplicates]
    return added.subset(kept), duplicates


def add_to_training(splits: DataSplits, added: AddedFolders | None, external: Sequence[str | os.PathLike] = (),
                    seed: int = 42, progress: bool = True, cache_dir: str | os.PathLike | None = None,
                    ) -> AddedTraining:
    """``splits`` with the added folders' training parts in ``train`` (audited first), their held-out parts
    and the external folders to score after training. ``splits.added`` records it all for metrics.json."""
    externals = [Path(folder) for folder in external]
    folders = list(added.folders) if added else []
    if not folders and not externals:
        return AddedTraining(splits, [], [])
    parts = [_split_folder(folder, added, index, seed) for index, folder in enumerate(folders)]
    holdouts = [(holdout_name(folder), folder, held) for folder, (_, held, _) in zip(folders, parts) if len(held)]
    against = {"test": splits.test, **{f"external {f.resolve().name}": scan_external(f)[0] for f in externals},
               **{f"held out {name}": held for name, _, held in holdouts}}
    training = Split([p for part, _, _ in parts for p in part.paths], [y for part, _, _ in parts for y in part.labels])
    if added is not None and added.holdout_only:
        training = Split([], [])
    duplicates: dict[str, list[str]] = {}
    if len(training):
        training, duplicates = audit_added(splits, training, against, added.drop_duplicates, progress, cache_dir)
    record = _record(splits, folders, parts, training, duplicates, added, seed, holdouts, externals)
    merged = Split(splits.train.paths + training.paths, splits.train.labels + training.labels, splits.train.skipped)
    return AddedTraining(dataclasses.replace(splits, train=merged, added=record), holdouts, externals)


def _record(splits: DataSplits, folders: list[Path], parts: list[tuple[Split, Split, dict[str, Any]]],
            training: Split, duplicates: dict[str, list[str]], added: AddedFolders | None, seed: int,
            holdouts: list[tuple[str, Path, Split]], externals: list[Path]) -> dict[str, Any]:
    """What metrics.json says about the added folders: per folder the images added and held out per class."""
    trained = {relative_path(p, splits.root) for p in training.paths}
    entries = []
    for folder, (part, held, notes) in zip(folders, parts):
        used = Counter(CLASSES[y] for p, y in zip(part.paths, part.labels) if relative_path(p, splits.root) in trained)
        dropped = [{"file": f, "same_as": same} for f, same in duplicates.items()
                   if _inside(Path(f) if Path(f).is_absolute() else splits.root / f, folder)]
        entries.append({"folder": folder.resolve().name, "root": str(folder.resolve()),
                        "added": {name: used[name] for name in CLASSES},
                        "held_out": held.counts() if len(held) else None,
                        "held_out_as": holdout_name(folder) if len(held) else None,
                        **notes, "dropped_duplicates": dropped})
    return {"folders": entries, "images": len(training), "holdout_fraction": added.holdout if added else None,
            "holdout_only": bool(added and added.holdout_only), "seed": seed,
            "external_folders": [name for name, _, _ in holdouts] + [f.resolve().name for f in externals]}


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())
