"""Find, scan, split and load the Kaggle chest X-ray dataset.

Layout: ``<root>/{train,val,test}/<CLASS>/*.{jpg,jpeg,png,dcm}``; the Kaggle archive spells the
tuberculosis folder ``TURBERCULOSIS`` and may nest the split folders one or two levels down.
"""

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

from .imageio import IMAGE_EXTENSIONS, check_dicom, decode_image, is_dicom, open_8bit

CLASSES: tuple[str, ...] = ("COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS")
FOLDER_ALIASES = {"TURBERCULOSIS": "TUBERCULOSIS"}
SPLITS = ("train", "val", "test")
KAGGLE_HANDLE = "jtiptj/chest-xray-pneumoniacovid19tuberculosis"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

EXPECTED_LAYOUT = (
    "Expected layout: DATA_DIR/{train,val,test}/{COVID19,NORMAL,PNEUMONIA,TUBERCULOSIS}/*.jpg|jpeg|png|dcm "
    "(the Kaggle spelling TURBERCULOSIS is accepted; the split folders may sit one or two levels down)."
)


class DatasetError(RuntimeError):
    """The dataset cannot be found or used; the message says what to do."""


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

    def counts(self) -> dict[str, dict[str, int]]:
        return {"train": self.train.counts(), "val": self.val.counts(), "test": self.test.counts()}

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        return self.train.skipped + self.val.skipped + self.test.skipped


def _child_dirs(path: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in path.iterdir() if p.is_dir()} if path.is_dir() else {}


def find_split_root(path: Path, max_depth: int = 3) -> Path | None:
    """Return the folder under ``path`` (searched breadth first) that holds ``train`` and ``test``."""
    frontier = [Path(path)]
    for _ in range(max_depth + 1):
        next_frontier = []
        for folder in sorted(frontier):
            children = _child_dirs(folder)
            if "train" in children and "test" in children:
                return folder
            next_frontier.extend(children.values())
        frontier = next_frontier
    return None


def is_dataset_root(folder: Path) -> bool:
    """Whether ``folder`` holds ``train/`` and ``test/``, each with at least one class folder."""
    children = _child_dirs(folder)
    names = set(CLASSES) | set(FOLDER_ALIASES)
    return all(split in children and any(name.upper() in names for name in _child_dirs(children[split]))
               for split in ("train", "test"))


def find_dataset_roots(base: Path, max_depth: int = 5) -> list[Path]:
    """Every folder under ``base`` laid out as the dataset (see :func:`is_dataset_root`), whatever it is
    called: an attached copy or fork of the Kaggle dataset has its own folder name. A found root is not
    searched further."""
    found, frontier = [], [Path(base)]
    for _ in range(max_depth + 1):
        next_frontier = []
        for folder in sorted(frontier):
            if is_dataset_root(folder):
                found.append(folder)
            else:
                next_frontier.extend(_child_dirs(folder).values())
        frontier = next_frontier
    return sorted(found)


def find_attached_dataset(input_root: Path) -> Path:
    """The one dataset under a Kaggle input root (found by its layout, whatever its folder is called);
    no dataset, or more than one, is an error that says what the input root holds."""
    roots = find_dataset_roots(input_root)
    if len(roots) == 1:
        return roots[0]
    if roots:
        raise DatasetError(f"{len(roots)} copies of the dataset under {str(input_root)!r}: "
                           f"{', '.join(map(str, roots))}. Attach one, or choose with CXR_DATA_DIR.")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(input_root).iterdir())
    found = ", ".join(entries[:10]) + (f" and {len(entries) - 10} more" if len(entries) > 10 else "") or "nothing"
    raise DatasetError(f"No dataset under {str(input_root)!r} (it holds {found}). Attach the Kaggle dataset "
                       f"{KAGGLE_HANDLE} (Add Input) or a copy of it. {EXPECTED_LAYOUT}")


def download_dataset(handle: str = KAGGLE_HANDLE) -> Path:
    """Download (or reuse kagglehub's cached copy of) the public Kaggle dataset.

    No interactive login: the dataset is public, and kagglehub uses credentials only when they
    are already configured (``~/.kaggle/kaggle.json`` or ``KAGGLE_USERNAME``/``KAGGLE_KEY``).
    """
    try:
        import kagglehub

        return Path(kagglehub.dataset_download(handle))
    except Exception as error:  # kagglehub raises many types (network, auth, HTTP); all mean the same here
        raise DatasetError(
            f"Could not download the Kaggle dataset {handle!r} with kagglehub "
            f"({type(error).__name__}: {error}). If this machine is offline or has no Kaggle access, "
            "download the dataset elsewhere and pass its folder with --data-dir DATA_DIR (or set "
            f"CXR_DATA_DIR). {EXPECTED_LAYOUT}"
        ) from None


def locate_dataset(data_dir: str | os.PathLike | None = None) -> Path:
    """Find the split root: explicit ``data_dir`` first, then ``CXR_DATA_DIR``, then a kagglehub download."""
    source = data_dir or os.environ.get("CXR_DATA_DIR")
    if source:
        base = Path(source).expanduser()
        if not base.exists():
            raise DatasetError(f"Data folder {str(base)!r} does not exist. {EXPECTED_LAYOUT}")
    else:
        base = download_dataset()
    root = find_split_root(base)
    if root is None:
        raise DatasetError(f"No train/ and test/ folders found in {str(base)!r}. {EXPECTED_LAYOUT}")
    return root


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
                image_format = image.format
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
    return None


def scan_split(root: Path, split: str, check: bool = True) -> Split:
    """List the images of one split with their labels; unusable files go to ``Split.skipped``."""
    split_dir = _child_dirs(root).get(split)
    if split_dir is None:
        raise DatasetError(f"Split folder {split!r} is missing under {str(root)!r}. {EXPECTED_LAYOUT}")
    class_dirs: dict[str, Path] = {}
    for name, folder in _child_dirs(split_dir).items():
        label = FOLDER_ALIASES.get(name.upper(), name.upper())
        if label in CLASSES:
            class_dirs[label] = folder
    missing = [c for c in CLASSES if c not in class_dirs]
    if missing:
        raise DatasetError(
            f"Class folder(s) {', '.join(missing)} missing in {str(split_dir)!r}. {EXPECTED_LAYOUT}"
        )
    result = Split([], [])
    for label, name in enumerate(CLASSES):
        for path in sorted(class_dirs[name].iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            reason = "not an image file" if path.suffix.lower() not in IMAGE_EXTENSIONS else None
            if reason is None and check:
                reason = check_image(path)
            if reason is None:
                result.paths.append(path)
                result.labels.append(label)
            else:
                result.skipped.append((path, reason))
    if not result.paths:
        raise DatasetError(f"Split {split!r} in {str(root)!r} contains no usable images. {EXPECTED_LAYOUT}")
    return result


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
    showing the whole image. What a model sees comes from :func:`cxr.imageio.decode_image`."""
    return open_8bit(path).convert("RGB")


def build_transforms(
    image_size: int, train: bool, augment: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    resize: int | None = None,
) -> v2.Compose:
    """Training augmentation suited to chest X-rays (small geometric and exposure changes, no vertical
    flips) or evaluation resize + center crop; both end with the weights' normalisation. ``resize`` is
    the evaluation resize stored with the weights (ResNet V2 weights use 232 for 224, ViT 256); the
    default is the classic 256/224 ratio."""
    if train and augment:
        geometry = [
            v2.RandomResizedCrop(image_size, scale=(0.7, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(degrees=7, translate=(0.04, 0.04)),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ]
    else:
        resize = resize or round(image_size * 256 / 224)
        geometry = [v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(
        [v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    )


class XRayDataset(Dataset):
    """Images of one split, decoded on access into the ``side`` square that the decoded-image cache
    holds (:func:`cxr.imageio.decode_image`), then transformed as a batch of one by ``transform`` (an
    ``augment.TrainAugment`` or ``EvalTransform``): the cache's pixels without the cache."""

    def __init__(self, split: Split, transform: Callable[[torch.Tensor], torch.Tensor], side: int) -> None:
        self.split, self.transform, self.side = split, transform, side

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        square = torch.from_numpy(decode_image(self.split.paths[index], self.side))[None, None]
        return self.transform(square)[0], self.split.labels[index]
