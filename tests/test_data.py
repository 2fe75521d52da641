"""Scanning, labels, skipped files, image modes and the validation split."""

from __future__ import annotations

import io
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.data.augment import TrainAugment
from cxr.data.dataset import XRayDataset, check_image, load_image, load_splits, scan_split, stratified_split
from cxr.data.layout import CLASSES, DatasetError
from cxr.data.imageio import cache_side
from cxr.data.synthetic import write_synthetic_dataset

BAD_FILES = {"corrupt.jpg", "empty.png", "notes.txt", "truncated.jpg"}


def image_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()}


def small_dataset(root: Path, **counts: int) -> Path:
    """A clean synthetic dataset (no bad files), cheap enough to write per test."""
    return write_synthetic_dataset(root, counts=counts or {"train": 10, "val": 2, "test": 2}, size=16, bad_files=False)


def test_scan_labels_follow_folders_and_alias(synthetic_root):
    split = scan_split(synthetic_root, "train")
    assert (synthetic_root / "train" / "TURBERCULOSIS").is_dir()
    assert not (synthetic_root / "train" / "TUBERCULOSIS").exists()
    for path, label in zip(split.paths, split.labels):
        folder = path.parent.name
        assert CLASSES[label] == ("TUBERCULOSIS" if folder == "TURBERCULOSIS" else folder)
    expected = {name: len(image_files(synthetic_root / "train" / folder) - BAD_FILES)
                for name, folder in zip(CLASSES, ("COVID19", "NORMAL", "PNEUMONIA", "TURBERCULOSIS"))}
    assert split.counts() == expected
    assert split.counts()["TUBERCULOSIS"] > 0


def test_bad_files_are_skipped_with_reasons(synthetic_root):
    split = scan_split(synthetic_root, "train")
    reasons = {path.name: why for path, why in split.skipped}
    assert set(reasons) == BAD_FILES
    assert reasons["empty.png"] == "empty file"
    assert reasons["notes.txt"] == "not an image file"
    assert reasons["truncated.jpg"] == "truncated JPEG"
    assert reasons["corrupt.jpg"].startswith("unreadable")
    kept = {p.name for p in split.paths}
    assert {"gray.png", "rgba.png", "sixteen_bit.png"} <= kept
    assert not BAD_FILES & kept


def test_skipped_files_reported_in_one_counting_warning(synthetic_root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_splits(synthetic_root)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"Skipped {len(BAD_FILES)} unusable file(s)")
    named = sum(name in messages[0] for name in BAD_FILES)
    assert named >= 1 and (named == len(BAD_FILES) or f"and {len(BAD_FILES) - named} more" in messages[0])
    assert len(splits.skipped) == len(BAD_FILES)


def test_every_scanned_image_decodes(synthetic_root):
    """Scanning must catch every file that would crash a DataLoader in the middle of an epoch."""
    split = scan_split(synthetic_root, "train")
    dataset = XRayDataset(split, TrainAugment(32), cache_side(32))
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert label == split.labels[index]


def test_truncated_png_is_skipped_and_jpeg_padding_is_not(tmp_path):
    pixels = (np.arange(48 * 48).reshape(48, 48) % 251).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    (tmp_path / "padded.jpg").write_bytes(buffer.getvalue() + b"\x00")  # as DICOM exports write them
    (tmp_path / "fake.png").write_text("plain text with an image extension")
    assert check_image(tmp_path / "cut.png") is not None
    assert check_image(tmp_path / "fake.png") == "not an image"
    assert check_image(tmp_path / "padded.jpg") is None
    assert load_image(tmp_path / "padded.jpg").size == (48, 48)


def test_class_folders_match_case_insensitively(tmp_path):
    root = small_dataset(tmp_path / "data")
    for folder, new_name in (("COVID19", "covid19"), ("NORMAL", "Normal"), ("TURBERCULOSIS", "turberculosis")):
        (root / "train" / folder).rename(root / "train" / new_name)
    (root / "train").rename(root / "Train")
    split = scan_split(root, "train")
    assert split.counts() == {name: 10 for name in CLASSES}


def _gradient(width: int = 40, height: int = 20) -> np.ndarray:
    return np.tile(np.linspace(0, 255, width, dtype=np.float64), (height, 1))


def _write_mode(path: Path, mode: str) -> None:
    gray = _gradient().astype(np.uint8)
    if mode == "I;16":
        Image.fromarray((_gradient() * 257).astype(np.uint16)).save(path)
    elif mode == "P":
        Image.fromarray(gray).convert("P").save(path, transparency=0)
    else:
        Image.fromarray(gray).convert(mode).save(path)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("L", ".png"), ("LA", ".png"), ("RGB", ".jpg"), ("RGBA", ".png"), ("P", ".png"), ("I;16", ".png"),
     ("CMYK", ".jpg"), ("L", ".jpg")],
)
def test_any_image_mode_loads_as_8bit_rgb(tmp_path, mode, suffix):
    path = tmp_path / f"image{suffix}"
    _write_mode(path, mode)
    with Image.open(path) as original:
        assert original.mode == mode
    assert check_image(path) is None
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 20)
    pixels = np.asarray(image).astype(int)
    # The left-to-right gradient survives: dark on the left, bright on the right (16-bit is rescaled, not clipped).
    assert pixels[:, :4].mean() < 40 and pixels[:, -4:].mean() > 200


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    pixels = np.zeros((20, 40), dtype=np.uint8)
    pixels[:, :20] = 255  # bright left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / f"rotated{suffix}"
    Image.fromarray(pixels).convert("RGB").save(path, exif=exif)
    with Image.open(path) as stored:
        assert stored.size == (40, 20)
    shown = np.asarray(load_image(path)).mean(axis=2)
    assert shown.shape == (40, 20)  # width and height swapped
    assert shown[:20].mean() > 200 and shown[20:].mean() < 50  # the bright left half is now on top


def test_missing_split_is_a_clear_error(tmp_path):
    root = small_dataset(tmp_path / "data")
    shutil.rmtree(root / "val")
    with pytest.raises(DatasetError, match=r"Split folder 'val' is missing .*Expected layout"):
        load_splits(root, val_source="given")
    assert len(load_splits(root).val) > 0  # the default carves validation out of train and needs no val/


def test_missing_class_is_a_clear_error(tmp_path):
    root = small_dataset(tmp_path / "data")
    shutil.rmtree(root / "test" / "PNEUMONIA")
    with pytest.raises(DatasetError, match=r"Class folder\(s\) PNEUMONIA missing .*test"):
        load_splits(root)


def test_split_without_usable_images_is_a_clear_error(tmp_path):
    root = small_dataset(tmp_path / "data")
    for image in (root / "test").rglob("*.*"):
        image.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"Split 'test' .* contains no usable images"):
        load_splits(root)


def test_stratified_split_keeps_class_proportions():
    labels = [0] * 100 + [1] * 50 + [2] * 30 + [3] * 20
    kept, held_out = stratified_split(labels, 0.1, seed=0)
    assert len(held_out) == 20
    held_counts = Counter(labels[i] for i in held_out)
    for label, total in Counter(labels).items():
        assert abs(held_counts[label] - 0.1 * total) <= 1
    assert not set(kept) & set(held_out)
    assert sorted([*kept, *held_out]) == list(range(len(labels)))


def test_tiny_train_split_still_carves_one_validation_image_per_class(tmp_path):
    root = small_dataset(tmp_path / "data", train=6, test=2)  # 10% of 24 images is fewer than 4 classes
    splits = load_splits(root, val_source="carve", seed=3)
    assert splits.val.counts() == {name: 1 for name in CLASSES}
    assert splits.train.counts() == {name: 5 for name in CLASSES}


def test_skewed_train_split_validates_every_class():
    labels = [0] * 100 + [1] * 2 + [2] * 2 + [3] * 2  # 10% rounds the rare classes' share to nothing
    for seed in range(5):
        kept, held_out = stratified_split(labels, 0.1, seed)
        assert {labels[i] for i in held_out} == {0, 1, 2, 3}
        assert {labels[i] for i in kept} == {0, 1, 2, 3}
        assert sorted([*kept, *held_out]) == list(range(len(labels)))
    again = stratified_split(labels, 0.1, 4)
    assert np.array_equal(kept, again[0]) and np.array_equal(held_out, again[1])  # seeded


def test_class_with_one_training_image_is_named_when_carving(tmp_path):
    labels = [0] * 5 + [1] * 5 + [2] * 5 + [3]
    with pytest.raises(DatasetError, match="only one training image of TUBERCULOSIS, and every class needs two"):
        stratified_split(labels, 0.1, seed=0)


def test_carved_validation_is_seeded_and_disjoint(synthetic_root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scanned = scan_split(synthetic_root, "train")
        first, again, other = (load_splits(synthetic_root, seed=s) for s in (1, 1, 2))
    assert first.val_source == "carve"
    assert first.val.paths == again.val.paths and first.train.paths == again.train.paths
    assert first.val.paths != other.val.paths
    for splits in (first, other):
        assert not set(splits.train.paths) & set(splits.val.paths)
        assert sorted(splits.train.paths + splits.val.paths) == sorted(scanned.paths)
        assert all(v > 0 for v in splits.val.counts().values())  # stratified: every class is validated


def test_given_validation_uses_val_folder_and_test_is_untouched(synthetic_root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        given = load_splits(synthetic_root, val_source="given", seed=5)
        carved = load_splits(synthetic_root, seed=5)
    test = scan_split(synthetic_root, "test")
    assert given.val_source == "given"
    assert given.val.paths == scan_split(synthetic_root, "val").paths
    assert given.train.paths == scan_split(synthetic_root, "train").paths
    for splits in (given, carved):
        assert splits.test.paths == test.paths and splits.test.labels == test.labels
        assert not set(splits.test.paths) & (set(splits.train.paths) | set(splits.val.paths))
    with pytest.raises(ValueError, match="val_source"):
        load_splits(synthetic_root, val_source="test")


def test_limit_keeps_a_seeded_stratified_subset_of_each_split(tmp_path):
    root = write_synthetic_dataset(tmp_path / "data", {"train": 12, "val": 2, "test": 5}, size=16, bad_files=False)
    full = load_splits(root, seed=3)
    limited, again, other = (load_splits(root, seed=s, limit=4) for s in (3, 3, 4))
    assert limited.limit == 4 and full.limit is None
    for split in ("train", "val", "test"):
        kept, whole = getattr(limited, split), getattr(full, split)
        assert kept.counts() == {c: min(4, n) for c, n in whole.counts().items()}  # every class, at most 4
        assert set(kept.paths) <= set(whole.paths) and kept.paths == sorted(kept.paths, key=whole.paths.index)
        assert kept.paths == getattr(again, split).paths
    assert limited.val.paths == full.val.paths  # the carved split (1-2 per class) is below the limit
    assert limited.train.paths != other.train.paths and limited.test.paths != other.test.paths


def test_limit_below_one_is_refused_before_scanning(tmp_path):
    for limit in (0, -3):
        with pytest.raises(ValueError, match=f"limit per class must be at least 1, got {limit}"):
            load_splits(tmp_path / "not-even-there", limit=limit)


def test_dataset_is_found_by_layout_and_nowhere_else(tmp_path):
    from cxr.data.layout import find_dataset_roots

    first = write_synthetic_dataset(tmp_path / "a" / "renamed", {"train": 1, "val": 1, "test": 1}, 16, False)
    second = write_synthetic_dataset(tmp_path / "b" / "x" / "y", {"train": 1, "val": 1, "test": 1}, 16, False)
    (tmp_path / "c" / "train" / "cats").mkdir(parents=True)  # train/ and test/ without class folders
    (tmp_path / "c" / "test" / "dogs").mkdir(parents=True)
    assert find_dataset_roots(tmp_path) == [first, second]
    assert find_dataset_roots(tmp_path / "c") == []
