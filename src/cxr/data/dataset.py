"""Scan, split and load the chest X-ray dataset found by :mod:`cxr.data.layout` (whose names are re-exported here)."""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision.transforms import v2

from cxr.data.augment_ops import reference_transforms
from cxr.config import AUGMENTATION, Augmentation
from cxr.data.imageio import IMAGE_EXTENSIONS, check_dicom, check_jpeg_scans, check_shape, decode_image, is_dicom, open_8bit
from cxr.data.layout import (CLASSES, EXPECTED_CLASS_FOLDERS, EXPECTED_LAYOUT, FOLDER_ALIASES, IMAGENET_MEAN, IMAGENET_STD,
                             DatasetError, child_dirs, class_of)


@dataclass
class Split:
    """One split: image paths, integer labels (index into CLASSES) and the files skipped while scanning."""

    paths: list[Path]
    labels: list[int]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        return {c: int(sum(1 for y in self.labels if y == i)) for i, c in enumerate(CLASSES)}

    def subset(self, indices: list[int] | np.ndarray) -> Split:
        return Split([self.paths[i] for i in indices], [self.labels[i] for i in indices])


@dataclass
class DataSplits:
    """Train / validation / test splits, plus where the validation split came from."""

    root: Path
    train: Split
    val: Split
    test: Split
    val_source: str
    limit: int | None = None  # images per class and split kept by a quick run (None: all)
    added: dict | None = None  # images added to train from other folders (cxr.train.added_training), for metrics.json

    def counts(self) -> dict[str, dict[str, int]]:
        return {"train": self.train.counts(), "val": self.val.counts(), "test": self.test.counts()}

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        return self.train.skipped + self.val.skipped + self.test.skipped


def check_image(path: Path) -> str | None:
    """Return why ``path`` cannot be used as an image, or None when it can. Cheap: no full decode."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        if is_dicom(path):
            return check_dicom(path)
        with warnings.catch_warnings():  # over PIL's pixel limit: decoding it every epoch would stall training
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image_format, shape = image.format, check_shape(*image.size)
                if shape is not None:
                    return shape
                image.verify()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        return f"too large ({error})"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as error:
        return f"unreadable ({error})"
    if image_format == "JPEG":
        # The end-of-image marker must follow the last scan; bytes after it (DICOM exports pad JPEGs to an
        # even length with a zero byte, some devices append trailers) are harmless and must not reject the file.
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 1024))
            tail = handle.read()
        if tail.rfind(b"\xff\xd9") < max(0, tail.rfind(b"\xff\xda")):
            return "truncated JPEG"
        return check_jpeg_scans(path)
    return None


def class_folders(split_dir: Path) -> dict[str, list[Path]]:
    """The folders of each class in a split. Names are matched without case (and the Kaggle spelling
    TURBERCULOSIS), so ``NORMAL/`` and ``normal/`` are one class: both are used, with a warning, where one
    of them used to be dropped silently, which one depending on the directory order."""
    found: dict[str, list[Path]] = {}
    for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        label = FOLDER_ALIASES.get(folder.name.upper(), folder.name.upper())
        if label in CLASSES:
            found.setdefault(label, []).append(folder)
    for label, folders in found.items():
        if len(folders) > 1:
            warnings.warn(f"{str(split_dir)!r} holds {len(folders)} folders of class {label} "
                          f"({', '.join(f.name + '/' for f in folders)}); their images are merged.", stacklevel=3)
    return found


def _images_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def add_class_files(split: Split, folders: list[Path], label: int, check: bool = True) -> None:
    """Add the image files directly in ``folders`` to ``split`` under ``label``, and every file that cannot
    be used (including images in subfolders, which are not scanned) to ``split.skipped`` with the reason."""
    for path in sorted(p for folder in folders for p in folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():  # only files directly in a class folder are used: say so for the ones below
            split.skipped.extend((nested, f"in the subfolder {path.name}/ of {path.parent.name}/, which is "
                                          "not scanned") for nested in _images_below(path))
            continue
        if path.is_symlink() and not path.exists():
            split.skipped.append((path, "broken symbolic link"))
            continue
        if not path.is_file():
            continue
        reason = "not an image file" if path.suffix.lower() not in IMAGE_EXTENSIONS else None
        if reason is None and check:
            reason = check_image(path)
        if reason is None:
            split.paths.append(path)
            split.labels.append(label)
        else:
            split.skipped.append((path, reason))


def scan_split(root: Path, split: str, check: bool = True) -> Split:
    """List the images of one split with their labels; unusable files go to ``Split.skipped``."""
    split_dir = child_dirs(root).get(split)
    if split_dir is None:
        raise DatasetError(f"Split folder {split!r} is missing under {str(root)!r}. {EXPECTED_LAYOUT}")
    class_dirs = class_folders(split_dir)
    missing = [c for c in CLASSES if c not in class_dirs]
    if missing:
        raise DatasetError(
            f"Class folder(s) {', '.join(missing)} missing in {str(split_dir)!r}. {EXPECTED_LAYOUT}"
        )
    result = Split([], [])
    for label, name in enumerate(CLASSES):
        add_class_files(result, class_dirs[name], label, check)
    if not result.paths:
        raise DatasetError(f"Split {split!r} in {str(root)!r} contains no usable images. {EXPECTED_LAYOUT}")
    return result


class ExternalDataError(ValueError):
    """The external folder cannot be scored; the message says what is wrong and what is expected."""


def scan_external(folder: str | os.PathLike) -> tuple[Split, list[str], Path]:
    """The external images with their labels, the folders ignored (not a class), and the folder the
    class folders were found in (DIR, or DIR/test)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExternalDataError(f"external folder {str(folder)!r} does not exist or is not a folder")
    children = {p.name.lower(): p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    base = children.get("test", folder)
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    matched: dict[str, list[Path]] = {}
    ignored = []
    for path in folders:
        label = class_of(path.name)
        if label is None:
            ignored.append(path.name)
        else:
            matched.setdefault(label, []).append(path)
    if not matched:
        found = ", ".join(p.name for p in folders) or "no subfolders"
        raise ExternalDataError(f"no class folder in {str(base)!r} (found: {found}); {EXPECTED_CLASS_FOLDERS}")
    split = Split([], [])
    for label, name in enumerate(CLASSES):
        add_class_files(split, matched.get(name, []), label)
    if not split.paths:
        raise ExternalDataError(f"the class folders in {str(base)!r} hold no usable image; {EXPECTED_CLASS_FOLDERS}")
    return split, ignored, base


def warn_skipped(skipped: list[tuple[Path, str]], shown: int = 3) -> None:
    """One warning for all skipped files: how many, and a few names with the reason."""
    if skipped:
        examples = "; ".join(f"{p.name}: {why}" for p, why in skipped[:shown])
        more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
        warnings.warn(f"Skipped {len(skipped)} unusable file(s) ({examples}{more}).", stacklevel=2)


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) for a seeded split that keeps each class's share and holds out at least one
    image of every class: a ``fraction`` of a tiny or skewed train split would leave some classes unvalidated."""
    counts = Counter(labels)
    scarce = [CLASSES[label] for label, n in sorted(counts.items()) if n < 2]
    if scarce:
        raise DatasetError(
            f"Cannot carve a validation split out of train: only one training image of {', '.join(scarce)}, and "
            "every class needs two (one to train on, one to validate); add images or use --val-source given."
        )
    indices = np.arange(len(labels))
    # sklearn holds out ceil(fraction * n) images; fewer than there are classes cannot cover every class.
    size = fraction if math.ceil(fraction * len(labels)) >= len(counts) else len(counts)
    try:
        kept, held_out = train_test_split(indices, test_size=size, stratify=labels, random_state=seed)
    except ValueError as error:
        raise DatasetError(
            f"Cannot carve a stratified {fraction:.0%} validation split out of train ({error}); "
            "add images or use --val-source given."
        ) from None
    rng = np.random.default_rng(seed)
    for label in sorted(set(counts) - {labels[i] for i in held_out}):  # a rare class the proportions rounded away
        moved = rng.choice([i for i in kept if labels[i] == label])
        kept, held_out = kept[kept != moved], np.append(held_out, moved)
    return np.sort(kept), np.sort(held_out)


def check_limit(limit: int | None) -> None:
    """Refuse a per-class image limit below 1 before any file is scanned."""
    if limit is not None and limit < 1:
        raise ValueError(f"The image limit per class must be at least 1, got {limit}.")


def limit_per_class(split: Split, limit: int, seed: int) -> Split:
    """At most ``limit`` images of each class, drawn with ``seed`` (the same images every run) and kept in
    their original order: a smaller, still stratified split for a quick run."""
    check_limit(limit)
    rng = np.random.default_rng(seed)
    labels = np.asarray(split.labels)
    kept = []
    for label in range(len(CLASSES)):
        members = np.flatnonzero(labels == label)
        kept.extend(rng.choice(members, size=limit, replace=False) if len(members) > limit else members)
    chosen = split.subset(sorted(kept))
    return Split(chosen.paths, chosen.labels, split.skipped)


def load_splits(
    root: Path, val_source: str = "carve", val_fraction: float = 0.1, seed: int = 42, check: bool = True,
    limit: int | None = None,
) -> DataSplits:
    """Scan all splits. By default the validation split is carved out of train (stratified, seeded),
    because Kaggle's ``val`` holds only 38 images; ``val_source="given"`` uses Kaggle's ``val`` instead.
    The test split is only ever used for the final report. ``limit`` keeps at most that many images per
    class in each split (after the validation split is carved), for a quick run."""
    check_limit(limit)
    train, test = scan_split(root, "train", check), scan_split(root, "test", check)
    if val_source == "given":
        val = scan_split(root, "val", check)
    elif val_source == "carve":
        kept, held_out = stratified_split(train.labels, val_fraction, seed)
        val = train.subset(held_out)
        train = Split(train.subset(kept).paths, train.subset(kept).labels, train.skipped)
    else:
        raise ValueError(f"val_source must be 'carve' or 'given', not {val_source!r}")
    if limit is not None:
        train, val, test = (limit_per_class(split, limit, seed) for split in (train, val, test))
    splits = DataSplits(root, train, val, test, val_source, limit)
    warn_skipped(splits.skipped)
    return splits


def load_image(path: str | os.PathLike) -> Image.Image:
    """Any supported file (every image mode, 16-bit, DICOM) as 8-bit RGB, EXIF orientation applied: for
    showing the whole image. What a model sees comes from :func:`cxr.data.imageio.decode_image`."""
    return open_8bit(path).convert("RGB")


def build_transforms(
    image_size: int, train: bool, augment: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    resize: int | None = None, augmentation: Augmentation = AUGMENTATION,
) -> v2.Compose:
    """Training augmentation suited to chest X-rays (the torchvision references of ``augmentation``'s
    operations, :mod:`cxr.data.augment_ops`, which the device augmentation ``augment.TrainAugment`` runs) or
    evaluation resize + center crop; both end with the weights' normalisation. ``resize`` is
    the evaluation resize stored with the weights (ResNet V2 weights use 232 for 224, ViT 256); the
    default is the classic 256/224 ratio."""
    if train and augment:
        geometry = reference_transforms(image_size, augmentation)
    else:
        resize = resize or round(image_size * 256 / 224)
        geometry = [v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(
        [v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    )


class XRayDataset(Dataset):
    """Images of one split, decoded on access into the ``side`` square that the decoded-image cache
    holds (:func:`cxr.data.imageio.decode_image`), then transformed as a batch of one by ``transform`` (an
    ``augment.TrainAugment`` or ``EvalTransform``): the cache's pixels without the cache."""

    def __init__(self, split: Split, transform: Callable[[torch.Tensor], torch.Tensor], side: int) -> None:
        self.split, self.transform, self.side = split, transform, side

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        square = torch.from_numpy(decode_image(self.split.paths[index], self.side))[None, None]
        return self.transform(square)[0], self.split.labels[index]
