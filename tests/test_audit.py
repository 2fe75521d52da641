"""The data audit: counts, skipped files and why, image sizes, duplicates by content and near duplicates by
pixels, train/val/test leakage."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from cxr.audit.data_audit import audit_dataset, audit_training_splits, file_sha256, format_audit
from cxr.cli import main
from cxr.data.dataset import check_image, load_splits, scan_split
from cxr.data.layout import SPLITS
from cxr.data.layout import CLASSES
from cxr.report.readme import baseline_verdict
from cxr.data.synthetic import DEFAULT_COUNTS, write_synthetic_dataset
from cxr.train.run_options import RunOptions
from cxr.common.runtime import Runtime
from cxr.workflow import train_experiment

SMALL_COUNTS = {"train": 5, "val": 2, "test": 2}


def test_counts_skipped_files_and_sizes_of_the_synthetic_dataset(synthetic_root):
    report = audit_dataset(synthetic_root, progress=False)
    assert list(report["splits"]) == list(SPLITS)
    for name, split in report["splits"].items():
        assert split["counts"] == scan_split(synthetic_root, name).counts()
        assert split["width"] == split["height"] == {"min": 48, "median": 48.0, "max": 48}  # written at 48 px
    assert report["splits"]["test"]["counts"] == {c: DEFAULT_COUNTS["test"] for c in CLASSES}
    assert {"I;16", "RGBA", "L", "RGB"} <= set(report["splits"]["train"]["modes"])
    skipped = {Path(s["path"]).name: s["reason"] for s in report["splits"]["train"]["skipped"]}
    assert set(skipped) == {"corrupt.jpg", "empty.png", "notes.txt", "truncated.jpg"}
    assert (skipped["empty.png"], skipped["notes.txt"], skipped["truncated.jpg"]) == (
        "empty file", "not an image file", "truncated JPEG")
    duplicates = report["duplicates"]
    assert duplicates["groups"] == [] and sum(duplicates["within_split"].values()) == 0
    assert report["near_duplicates"]["groups"] == []  # distinct pictures (each its own random structure) are not near copies
    assert report["leakage"] == {"train/test": 0, "val/test": 0} and report["warnings"] == []


def leaky_dataset(root: Path) -> Path:
    """A test image copied into train under another class, a train image stored twice, and a test image
    re-encoded as JPEG into train (a near duplicate, not byte-identical)."""
    write_synthetic_dataset(root, SMALL_COUNTS, size=32, bad_files=False)
    shutil.copy(root / "test" / "NORMAL" / "test_000.png", root / "train" / "PNEUMONIA" / "from_test.png")
    shutil.copy(root / "train" / "COVID19" / "train_000.png", root / "train" / "COVID19" / "again.png")
    Image.open(root / "test" / "COVID19" / "test_000.png").save(root / "train" / "COVID19" / "reencoded.jpg", quality=70)
    return root


def plant(source: Path, target: Path, kind: str) -> None:
    """Save a copy of ``source`` changed the way public collections change the images they merge."""
    image = Image.open(source).convert("L")
    width, height = image.size
    if kind == "jpeg":
        image.save(target, quality=70)
    elif kind == "16-bit":
        Image.fromarray(np.asarray(image).astype(np.uint16) * 257).save(target)
    elif kind == "half-size":
        image.resize((width // 2, height // 2), Image.Resampling.BILINEAR).save(target)
    elif kind == "cropped":  # 5% off the left edge
        image.crop((round(width * 0.05), 0, width, height)).save(target)
    elif kind == "brightened":
        ImageEnhance.Brightness(image).enhance(1.3).save(target)
    elif kind == "contrast":
        ImageEnhance.Contrast(image).enhance(1.4).save(target)


PLANTED = [  # (source, copy, kind): within a split, into val, into test, and with another label
    ("train/COVID19/train_000.png", "train/COVID19/cropped.png", "cropped"),
    ("train/NORMAL/train_000.png", "train/NORMAL/brightened.png", "brightened"),
    ("train/PNEUMONIA/train_000.png", "train/PNEUMONIA/contrast.png", "contrast"),
    ("train/TURBERCULOSIS/train_000.png", "val/TURBERCULOSIS/half.png", "half-size"),
    ("test/NORMAL/test_000.png", "train/PNEUMONIA/from_test.jpg", "jpeg"),
    ("test/COVID19/test_000.png", "train/COVID19/from_test_16bit.png", "16-bit"),
]


def test_planted_near_copies_are_found_where_they_leak_and_nothing_else(tmp_path, capsys):
    root = write_synthetic_dataset(tmp_path / "data", SMALL_COUNTS, size=96, bad_files=False)
    for source, copy, kind in PLANTED:
        plant(root / source, root / copy, kind)
    assert main(["audit", "--data-dir", str(root), "--out", str(tmp_path / "assets"), "--quiet"]) == 0
    shown = capsys.readouterr().out
    report = json.loads((tmp_path / "assets" / "audit.json").read_text())
    near = report["near_duplicates"]
    found = {tuple(sorted(pair["files"])) for group in near["groups"] for pair in group["pairs"]}
    assert found == {tuple(sorted((source, copy))) for source, copy, _ in PLANTED}
    assert near["within_split"] == {"train": 3, "val": 0, "test": 0}
    assert near["across_splits"] == {"train/val": 1, "train/test": 2, "val/test": 0}
    assert near["leakage"] == {"into_val": 1, "into_test": 2}
    assert near["conflicting_labels"] == 1  # the NORMAL test image copied into train as PNEUMONIA
    assert report["duplicates"]["groups"] == [] and report["leakage"] == {"train/test": 0, "val/test": 0}
    assert "Near-duplicate leakage: into val 1 image(s), into test 2 image(s)" in shown
    assert "LEAKAGE: 2 test image(s) are near-duplicates" in shown and "LEAKAGE into val: 1 val image(s)" in shown
    assert "3 near-duplicates (the same picture re-encoded, resized, cropped or re-exposed) within train" in shown


def test_cli_audit_finds_duplicates_and_leakage_and_writes_json(tmp_path, capsys):
    root = leaky_dataset(tmp_path / "data")
    assert main(["audit", "--data-dir", str(root), "--out", str(tmp_path / "assets"), "--quiet"]) == 0
    shown = capsys.readouterr().out
    assert "Leakage into test: 1 image(s)" in shown and "LEAKAGE" in shown and "train/PNEUMONIA/from_test.png" in shown
    assert "1 duplicate image(s) within train: train/COVID19/again.png = train/COVID19/train_000.png." in shown

    report = json.loads((tmp_path / "assets" / "audit.json").read_text())
    assert report["leakage"] == {"train/test": 1, "val/test": 0}
    assert report["duplicates"]["within_split"] == {"train": 1, "val": 0, "test": 0}
    assert report["duplicates"]["across_splits"]["train/val"] == 0
    assert report["duplicates"]["conflicting_labels"] == 1  # the leaked copy is labelled PNEUMONIA, not NORMAL
    assert report["near_duplicates"]["leakage"] == {"into_val": 0, "into_test": 1}  # the re-encoded test image
    assert "train/COVID19/reencoded.jpg ~ test/COVID19/test_000.png" in shown
    groups = {g["sha256"]: sorted(f["path"] for f in g["files"]) for g in report["duplicates"]["groups"]}
    assert groups == {
        file_sha256(root / "test" / "NORMAL" / "test_000.png"): ["test/NORMAL/test_000.png", "train/PNEUMONIA/from_test.png"],
        file_sha256(root / "train" / "COVID19" / "again.png"): ["train/COVID19/again.png", "train/COVID19/train_000.png"],
    }


def test_training_warns_about_leakage_and_keeps_the_audit_in_metrics(tmp_path):
    root = leaky_dataset(tmp_path / "data")
    with pytest.warns(UserWarning, match="LEAKAGE|duplicate image|different class labels") as caught:
        metrics = train_experiment("mobilenet_v2_head", data_dir=root, out=tmp_path / "out",
                                   runtime=Runtime.create(progress=False), options=RunOptions(val_source="given"),
                                   epochs=1, batch_size=8, image_size=32, weights="none")
    shown = [str(w.message) for w in caught]
    assert any(message.startswith("LEAKAGE: 1 test image(s) are near-duplicates") for message in shown)
    assert "1 duplicate image(s) within train: train/COVID19/again.png = train/COVID19/train_000.png." in shown
    assert "1 identical image(s) carry different class labels." in shown
    audit = metrics["audit"]
    assert audit["leakage"] == {"train/test": 1, "val/test": 0}
    assert audit["near_leakage"] == {"into_val": 0, "into_test": 1}
    assert audit["near_duplicates_across_splits"]["train/test"] == 1
    assert audit["duplicates_within_split"]["train"] == 1
    assert audit["counts"]["train"] == load_splits(root, val_source="given").train.counts()
    saved = json.loads((tmp_path / "out" / "mobilenet_v2_head" / "metrics.json").read_text())
    assert saved["audit"] == audit


def test_huge_image_is_skipped_with_a_reason(tmp_path, monkeypatch):
    root = write_synthetic_dataset(tmp_path / "data", SMALL_COUNTS, size=32, bad_files=False)
    huge = root / "train" / "NORMAL" / "huge.png"
    Image.new("L", (12000, 12000)).save(huge, compress_level=1)  # 144 Mpixel: over PIL's bomb warning limit
    report = audit_dataset(root, progress=False)
    skipped = {s["path"]: s["reason"] for s in report["splits"]["train"]["skipped"]}
    assert skipped["train/NORMAL/huge.png"].startswith("too large (Image size (144000000 pixels) exceeds limit")
    assert report["splits"]["train"]["width"]["max"] == 32  # its header was never counted as a usable image
    # Twice PIL's limit raises DecompressionBombError instead of warning; that is skipped the same way.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12000 * 12000 // 3)
    assert check_image(huge).startswith("too large")


def test_folders_that_are_not_classes_are_reported(tmp_path):
    root = write_synthetic_dataset(tmp_path / "data", SMALL_COUNTS, size=32, bad_files=False)
    extra = root / "train" / "LUNG_OPACITY"
    extra.mkdir()
    shutil.copy(root / "train" / "NORMAL" / "train_000.png", extra / "image.png")
    report = audit_dataset(root, progress=False)
    assert report["ignored_folders"] == ["train/LUNG_OPACITY"]
    assert any("train/LUNG_OPACITY" in message for message in report["warnings"])


def test_cli_audit_of_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert main(["audit", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: Data folder") and "does not exist" in error
    assert not (tmp_path / "audit.json").exists()


def test_leakage_into_a_carved_validation_split_names_the_validation_image():
    """Carved from train, a validation image lives under train/: the warning says which copy is in validation."""
    from cxr.audit.data_audit import _near_warnings

    group = {"files": [{"split": "train", "class": "NORMAL", "path": "train/NORMAL/a.jpg"},
                       {"split": "val", "class": "NORMAL", "path": "train/NORMAL/b.jpg"}]}
    near = {"across_splits": {"train/val": 1}, "within_split": {}, "conflicting_labels": 0, "groups": [group]}
    [message] = _near_warnings(near)
    assert message.startswith("LEAKAGE into val: 1 val image(s)")
    assert "train/NORMAL/a.jpg ~ train/NORMAL/b.jpg (in validation)" in message


def test_audit_and_training_tell_one_story_about_leakage_into_a_carved_validation_split(tmp_path, capsys):
    """On disk the copies are duplicates within train; once training carves validation out of train some are
    leakage into val. The audit says how many, and it is the number training warns about."""
    root = write_synthetic_dataset(tmp_path / "data", SMALL_COUNTS, size=64, bad_files=False)
    for source in sorted((root / "train").glob("*/train_00[0-4].png")):
        shutil.copy(source, source.with_name(f"copy_{source.name}"))
    disk = audit_dataset(root, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        training = audit_training_splits(load_splits(root, seed=42), progress=False)
    carved = disk["carved_val_leakage"]
    assert carved["exact"] == training["duplicates"]["across_splits"]["train/val"] > 0
    assert carved["near"] == training["near_duplicates"]["across_splits"]["train/val"]
    assert disk["duplicates"]["across_splits"]["train/val"] == 0  # the val folder on disk holds no copy
    shown = format_audit(disk)
    assert f"{carved['exact']} exact and {carved['near']} near-duplicate group(s) of train would then sit" in shown
    assert "trained on" in shown and "images of the train folder on disk (validation not carved out)" in shown
    assert training["shortcut_baseline"]["trained_on"] == "the run's train split (validation carved out of it)"
    limited = audit_training_splits(load_splits(root, seed=42, limit=3), progress=False)
    assert limited["shortcut_baseline"]["trained_on"].endswith("at most 3 images per class (--limit))")
    verdict = baseline_verdict({"macro_f1": 0.9}, limited["shortcut_baseline"])
    assert verdict.endswith(f"(The baseline learned from {limited['shortcut_baseline']['train_images']} images of "
                            "the run's train split (validation carved out of it, at most 3 images per class "
                            f"(--limit)) and was tested on {limited['shortcut_baseline']['test_images']}.)")
