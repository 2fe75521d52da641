"""Audit a dataset before a model sees it.

Per split and class counts, the files skipped and why, image sizes (read from the file headers), exact
duplicates by content hash, and near duplicates by their pixels (:mod:`cxr.audit.near_duplicates`, on the
squares of the decoded-image cache that training reuses): within a split, across splits, and test or
validation images that also sit in train, called out as leakage because they inflate the scores. With a
train and a test split, also the shortcut baseline (:mod:`cxr.audit.source_baseline`): how well the file and
the image's border alone, never the lung field, predict the class.
``cxr audit`` prints the report and writes it as JSON; training runs the same audit on the splits it
uses and keeps the summary in metrics.json.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from cxr.common.progress import tqdm

from cxr.audit import near_duplicates
from cxr.audit import source_baseline as shortcut_baseline
from cxr.data.cache import cache_split
from cxr.data.imageio import cache_side
from cxr.evaluate.classification_report import write_json
from cxr.data.dataset import DataSplits, Split, scan_split, stratified_split
from cxr.data.layout import FOLDER_ALIASES, SPLITS, DatasetError, locate_dataset
from cxr.data.imageio import dicom_header, is_dicom
from cxr.data.layout import CLASSES, relative_path, visible_name

AUDIT_FILE = "audit.json"
EXAMPLES_SHOWN = 3
AUDIT_SIDE = cache_side(224)  # the squares every experiment trains from, so the audit fills the cache training reads
CHUNK = 1024


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Content hash of a file's bytes: equal hashes mean byte-identical images, whatever their names."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def image_header(path: str | os.PathLike) -> tuple[int, int, str]:
    """(width, height, mode) from the file header; PIL decodes no pixels until asked to."""
    if is_dicom(path):
        return dicom_header(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return image.width, image.height, image.mode


def _stats(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": int(min(values)), "median": float(np.median(values)), "max": int(max(values))}


def ignored_folders(root: Path) -> list[str]:
    """Folders inside the split folders that are not one of the classes: their images are not used."""
    found = []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLITS):
        for folder in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if FOLDER_ALIASES.get(folder.name.upper(), folder.name.upper()) not in CLASSES:
                found.append(relative_path(folder, root))
    return found


def audit_splits(
    splits: dict[str, Split], root: Path, progress: bool = True, notes: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Audit already scanned splits: counts, skipped files, image sizes, exact and near duplicates."""
    root = Path(root)
    report: dict[str, Any] = {"root": str(root), **(notes or {}), "splits": {}}
    by_hash: dict[str, list[dict[str, str]]] = defaultdict(list)
    total = sum(len(split) for split in splits.values())
    bar = tqdm(total=total, desc="audit", leave=False, disable=not progress)
    for name, split in splits.items():
        widths, heights, modes = [], [], Counter()
        for path, label in zip(split.paths, split.labels):
            width, height, mode = image_header(path)
            widths.append(width)
            heights.append(height)
            modes[mode] += 1
            by_hash[file_sha256(path)].append({"split": name, "class": CLASSES[label],
                                               "path": relative_path(path, root)})
            bar.update()
        report["splits"][name] = {
            "counts": split.counts(),
            "total": len(split),
            "skipped": [{"path": relative_path(p, root), "reason": why} for p, why in split.skipped],
            "width": _stats(widths),
            "height": _stats(heights),
            "modes": dict(sorted(modes.items())),
        }
    bar.close()
    exact = [{"sha256": digest, "files": files} for digest, files in sorted(by_hash.items()) if len(files) > 1]
    report["duplicates"] = _duplicates(exact, list(splits))
    report["leakage"] = {pair: n for pair, n in report["duplicates"]["across_splits"].items() if "test" in pair}
    near = _near_duplicate_groups(splits, root, by_hash, cache_dir, progress)
    report["near_duplicates"] = {**_duplicates(near, list(splits)), "method": _near_method()}
    report["near_duplicates"]["leakage"] = _near_leakage(report["near_duplicates"]["across_splits"])
    if "train" in splits and "test" in splits:  # reads the squares just decoded into the cache
        report["shortcut_baseline"] = shortcut_baseline.baseline_report(splits["train"], splits["test"], AUDIT_SIDE,
                                                                         cache_dir, progress)
    report["warnings"] = _warnings(report)
    return report


def _duplicates(groups: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Counts over groups of copies: extra copies within each split, groups spanning two splits, groups
    whose copies carry more than one class."""
    within = {name: 0 for name in names}
    across = {f"{a}/{b}": 0 for a, b in combinations(names, 2)}
    conflicting = 0
    for group in groups:
        per_split = Counter(f["split"] for f in group["files"])
        for name, copies in per_split.items():
            within[name] += copies - 1
        for a, b in combinations(names, 2):
            across[f"{a}/{b}"] += int(a in per_split and b in per_split)
        conflicting += int(len({f["class"] for f in group["files"]}) > 1)
    return {
        "within_split": within,
        "across_splits": across,
        "conflicting_labels": conflicting,
        "groups": groups,
    }


def _near_method() -> dict[str, Any]:
    return {"hash": f"64-bit DCT hash of {len(near_duplicates.VIEWS)} aligned views (zoom, shift)",
            "max_hash_bits": near_duplicates.MAX_HASH_BITS, "min_correlation": near_duplicates.MIN_CORRELATION,
            "cache_side": AUDIT_SIDE}


def _near_leakage(across: dict[str, int]) -> dict[str, int]:
    """Near copies across splits by where they leak: a val image seen in train inflates validation, a test
    image seen in train or val inflates the test scores."""
    into_val = sum(n for pair, n in across.items() if pair.endswith("/val"))
    return {"into_val": into_val, "into_test": sum(n for pair, n in across.items() if pair.endswith("/test"))}


def _describe_split(split: Split, cache_dir: str | os.PathLike | None, progress: bool, name: str):
    """Hashes and views of a split's images, read from (or decoded into) the image cache a chunk at a time."""
    cached = cache_split(split, AUDIT_SIDE, cache_dir, progress=progress, description=f"decode {name}")
    described = [near_duplicates.describe(cached.images[start:start + CHUNK])
                 for start in range(0, len(cached.images), CHUNK)]
    hashes = np.concatenate([h for h, _ in described], axis=1) if described else np.zeros((0, 0), np.uint64)
    views = np.concatenate([v for _, v in described]) if described else np.zeros((0, 0, 0), np.float32)
    return cached.split, hashes, views


def _near_duplicate_groups(
    splits: dict[str, Split], root: Path, by_hash: dict[str, list[dict[str, str]]],
    cache_dir: str | os.PathLike | None, progress: bool,
) -> list[dict[str, Any]]:
    """Groups of images that show the same picture but are not byte-identical (one file stands for each
    set of exact copies, which are reported already), joined through confirmed pairs."""
    exact_copy = {f["path"] for files in by_hash.values() for f in files[1:]}
    files, hashes, views = [], [], []
    for name, split in splits.items():
        decoded, split_hashes, split_views = _describe_split(split, cache_dir, progress, name)
        keep = [k for k, path in enumerate(decoded.paths) if relative_path(path, root) not in exact_copy]
        files += [{"split": name, "class": CLASSES[decoded.labels[k]], "path": relative_path(decoded.paths[k], root)}
                  for k in keep]
        hashes.append(split_hashes[:, keep])
        views.append(split_views[keep])
    if not files:
        return []
    pairs = near_duplicates.near_duplicate_pairs(np.concatenate(hashes, axis=1), np.concatenate(views))
    if not pairs:
        return []
    graph = coo_matrix((np.ones(len(pairs)), ([p[0] for p in pairs], [p[1] for p in pairs])), shape=(len(files),) * 2)
    _, component = connected_components(graph, directed=False)
    groups: dict[int, dict[str, Any]] = {}
    for i, j, bits, correlation in pairs:
        group = groups.setdefault(int(component[i]), {"files": [], "pairs": []})
        group["pairs"].append({"files": [files[i]["path"], files[j]["path"]], "hash_bits": bits, "correlation": correlation})
    for label, group in groups.items():
        group["files"] = [files[k] for k in np.flatnonzero(component == label)]
    return sorted(groups.values(), key=lambda group: group["files"][0]["path"])


def _named(file: dict[str, Any]) -> str:
    """A file's path, and the split it belongs to when its folder says another (a validation split carved out
    of train holds files under train/)."""
    path = str(file["path"])
    if file["split"] in Path(path).parts:
        return path
    return f"{path} (in {'validation' if file['split'] == 'val' else file['split']})"


def _examples(groups: list[dict[str, Any]], splits: set[str], copies: int = 1, joiner: str = " = ") -> str:
    """A few duplicate groups, each shown as its files in ``splits``, where every split holds ``copies`` or more."""
    shown = []
    for group in groups:
        files = [_named(f) for f in group["files"] if f["split"] in splits]
        if all(sum(f["split"] == name for f in group["files"]) >= copies for name in splits):
            shown.append(joiner.join(files))
    return "; ".join(shown[:EXAMPLES_SHOWN])


def _warnings(report: dict[str, Any]) -> list[str]:
    """Plain sentences for what needs a person's attention; training repeats them as warnings."""
    messages = []
    duplicates = report["duplicates"]
    for pair, count in report["leakage"].items():
        if count:
            other = pair.split("/")[0]
            messages.append(
                f"LEAKAGE: {count} test image(s) are byte-identical copies of {other} images, which inflates "
                f"the test scores; e.g. {_examples(duplicates['groups'], {other, 'test'})}."
            )
    for pair, count in duplicates["across_splits"].items():
        if count and pair not in report["leakage"]:
            messages.append(f"{count} image(s) appear in both {pair.replace('/', ' and ')}, which inflates validation scores.")
    for name, count in duplicates["within_split"].items():
        if count:
            messages.append(f"{count} duplicate image(s) within {name}: {_examples(duplicates['groups'], {name}, 2)}.")
    if duplicates["conflicting_labels"]:
        messages.append(f"{duplicates['conflicting_labels']} identical image(s) carry different class labels.")
    messages += _near_warnings(report["near_duplicates"])
    for name, split in report["splits"].items():
        empty = [c for c, n in split["counts"].items() if n == 0]
        if empty:
            messages.append(f"The {name} split has no images of {', '.join(empty)}.")
    if report.get("ignored_folders"):
        shown = ", ".join(visible_name(name) for name in report["ignored_folders"])
        messages.append(f"Folders that are not classes were ignored: {shown}.")
    return messages


def _near_warnings(near: dict[str, Any]) -> list[str]:
    """The exact-duplicate warnings, for copies that differ in encoding, size, crop or exposure."""
    copies = "near-duplicates (the same picture re-encoded, resized, cropped or re-exposed)"
    messages = []
    for pair, count in near["across_splits"].items():
        first, second = pair.split("/")
        if count:
            kind = "LEAKAGE" if second == "test" else "LEAKAGE into val"
            harm = "the test scores" if second == "test" else "the validation scores and early stopping"
            messages.append(f"{kind}: {count} {second} image(s) are {copies} of {first} images, which inflates {harm}; "
                            f"e.g. {_examples(near['groups'], {first, second}, joiner=' ~ ')}.")
    for name, count in near["within_split"].items():
        if count:
            messages.append(f"{count} {copies} within {name}: {_examples(near['groups'], {name}, 2, ' ~ ')}.")
    if near["conflicting_labels"]:
        messages.append(f"{near['conflicting_labels']} group(s) of near-duplicate images carry different class labels.")
    return messages


def audit_dataset(
    data_dir: str | os.PathLike | None = None, progress: bool = True, cache_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Audit the splits as they are on disk (``train``, ``val`` when present, ``test``); images are decoded
    into (or read from) the image cache under ``cache_dir``."""
    root = locate_dataset(data_dir)
    present = {p.name.lower() for p in root.iterdir() if p.is_dir()}
    splits = {name: scan_split(root, name) for name in SPLITS if name in present}
    notes = {"source": "folders on disk", "ignored_folders": ignored_folders(root)}
    report = audit_splits(splits, root, progress, notes, cache_dir)
    _name_baseline_data(report, "the train folder on disk (validation not carved out)")
    if "train" in splits:
        report["carved_val_leakage"] = carved_val_leakage(report, splits["train"], root)
    return report


def _name_baseline_data(report: dict[str, Any], trained_on: str) -> None:
    """Say which split (and limit) the shortcut baseline learned from: its score moves with them."""
    if isinstance(report.get("shortcut_baseline"), dict):
        report["shortcut_baseline"]["trained_on"] = trained_on


def carved_val_leakage(report: dict[str, Any], train: Split, root: Path, seed: int = 42,
                       fraction: float = 0.1) -> dict[str, Any] | None:
    """Copies the validation split ``cxr train`` carves out of train (default seed, no --limit) would share with
    the images it trains on: the audit of the folders on disk sees them only as duplicates within train, training
    warns about them as leakage into val; this says both in one place. None when train cannot be carved."""
    try:
        _, held_out = stratified_split(train.labels, fraction, seed)
    except DatasetError:
        return None
    held = {relative_path(train.paths[i], root) for i in held_out}

    def spanning(groups: list[dict[str, Any]]) -> int:
        paths = [{f["path"] for f in group["files"] if f["split"] == "train"} for group in groups]
        return sum(1 for inside in paths if inside & held and inside - held)

    return {"seed": seed, "fraction": fraction, "exact": spanning(report["duplicates"]["groups"]),
            "near": spanning(report["near_duplicates"]["groups"])}


def audit_training_splits(
    splits: DataSplits, progress: bool = True, cache_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Audit the splits a training run actually uses (with a carved validation split, val comes from train)."""
    report = audit_splits(
        {"train": splits.train, "val": splits.val, "test": splits.test}, splits.root, progress,
        {"source": f"training splits (val_source={splits.val_source})", "ignored_folders": ignored_folders(splits.root)},
        cache_dir,
    )
    carved = "validation carved out of it" if splits.val_source == "carve" else "Kaggle's val folder kept apart"
    limit = f", at most {splits.limit} images per class (--limit)" if splits.limit else ""
    _name_baseline_data(report, f"the run's train split ({carved}{limit})")
    return report


def audit_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The audit without per-file lists: what metrics.json keeps."""
    return {
        "source": report.get("source"),
        "counts": {name: split["counts"] for name, split in report["splits"].items()},
        "skipped": {name: len(split["skipped"]) for name, split in report["splits"].items()},
        "width": {name: split["width"] for name, split in report["splits"].items()},
        "height": {name: split["height"] for name, split in report["splits"].items()},
        "duplicates_within_split": report["duplicates"]["within_split"],
        "duplicates_across_splits": report["duplicates"]["across_splits"],
        "conflicting_labels": report["duplicates"]["conflicting_labels"],
        "leakage": report["leakage"],
        "near_duplicates_within_split": report["near_duplicates"]["within_split"],
        "near_duplicates_across_splits": report["near_duplicates"]["across_splits"],
        "near_conflicting_labels": report["near_duplicates"]["conflicting_labels"],
        "near_leakage": report["near_duplicates"]["leakage"],
        "warnings": report["warnings"],
    }


def format_audit(report: dict[str, Any]) -> str:
    """The report as text: one table row per split, then skipped files, duplicates and warnings."""
    rows = []
    for name, split in report["splits"].items():
        width, height = split["width"] or {}, split["height"] or {}
        rows.append({
            "split": name,
            **split["counts"],
            "total": split["total"],
            "skipped": len(split["skipped"]),
            "duplicates": report["duplicates"]["within_split"][name],
            "near duplicates": report["near_duplicates"]["within_split"][name],
            "width min/med/max": "/".join(f"{width.get(k, 0):g}" for k in ("min", "median", "max")),
            "height min/med/max": "/".join(f"{height.get(k, 0):g}" for k in ("min", "median", "max")),
        })
    lines = [f"Data audit of {report['root']} ({report.get('source', '')})", "",
             pd.DataFrame(rows).to_string(index=False), ""]
    skipped = [(name, s) for name, split in report["splits"].items() for s in split["skipped"]]
    lines.append(f"Skipped files: {len(skipped)}")
    lines += [f"  {s['path']}: {s['reason']}" for _, s in skipped]
    duplicates = report["duplicates"]
    within = ", ".join(f"{k} {v}" for k, v in duplicates["within_split"].items())
    across = ", ".join(f"{k} {v}" for k, v in duplicates["across_splits"].items())
    lines += ["", f"Duplicate images (by content): within {within}; across {across}; "
                  f"conflicting labels {duplicates['conflicting_labels']}"]
    leaked = sum(report["leakage"].values())
    lines.append(f"Leakage into test: {leaked} image(s)" if leaked else "Leakage into test: none")
    near = report["near_duplicates"]
    within = ", ".join(f"{k} {v}" for k, v in near["within_split"].items())
    across = ", ".join(f"{k} {v}" for k, v in near["across_splits"].items())
    lines += [f"Near duplicates (by pixels, not byte-identical): within {within}; across {across}; "
              f"conflicting labels {near['conflicting_labels']}",
              f"Near-duplicate leakage: into val {near['leakage']['into_val']} image(s), "
              f"into test {near['leakage']['into_test']} image(s)"]
    carved = report.get("carved_val_leakage")
    if carved:
        lines.append(f"The val above is the folder on disk. cxr train carves its validation split out of train "
                     f"({carved['fraction']:.0%}, seed {carved['seed']}, no --limit): {carved['exact']} exact and "
                     f"{carved['near']} near-duplicate group(s) of train would then sit in both its train and "
                     "validation splits, which training warns about as leakage into val.")
    if "shortcut_baseline" in report:
        lines += [""] + shortcut_baseline.format_baseline(report["shortcut_baseline"])
    if report["warnings"]:
        lines += ["", "Warnings:"] + [f"  - {message}" for message in report["warnings"]]
    return "\n".join(lines)


def write_audit(report: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write the full report (every skipped file and duplicate group) as ``out_dir/audit.json``."""
    path = Path(out_dir) / AUDIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, path)
    return path
