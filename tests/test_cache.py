"""The decoded-image cache: decode once, reuse, rebuild only what changed, skip what cannot be decoded."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.data import cache
from cxr.cli import build_parser
from cxr.config import get_experiment
from cxr.data.dataset import Split, XRayDataset, load_image
from cxr.data.imageio import cache_side
from cxr.data.layout import CLASSES
from cxr.train.pipeline import build_dataset
from cxr.models.classifier import preprocessing
from cxr.common.runtime import Runtime

SIDE = 24


def _write_images(folder: Path) -> Split:
    """Six small images: PNG and JPEG, square and not, grayscale and RGB, each with its own brightness."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(6):
        size = (40, 30) if index % 2 else (30, 44)
        pixels = np.full(size[::-1], 30 * index + 20, dtype=np.uint8)
        pixels[: size[1] // 2] += 10
        path = folder / f"image_{index}.{'jpg' if index % 3 == 0 else 'png'}"
        image = Image.fromarray(pixels)
        (image.convert("RGB") if index == 3 else image).save(path)
        paths.append(path)
    return Split(paths, [index % len(CLASSES) for index in range(6)])


def _reference(path: Path, side: int) -> np.ndarray:
    """What the cache must hold: the PIL path's image, in grayscale, shorter side ``side``, centre square."""
    image = load_image(path).convert("L")
    scale = side / min(image.size)
    size = (max(side, round(image.width * scale)), max(side, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - side) // 2, (size[1] - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)))


@pytest.fixture
def counting_decoder(monkeypatch):
    """Record every decode (and still decode)."""
    calls = []
    real = cache.decode_image

    def decode(path, side):
        calls.append(Path(path).name)
        return real(path, side)

    monkeypatch.setattr(cache, "decode_image", decode)
    return calls


def test_decoded_images_match_the_pil_path(synthetic_root):
    folder = synthetic_root / "train" / "NORMAL"
    for name in ("gray.png", "rgba.png", "sixteen_bit.png", "train_000.png"):
        assert np.array_equal(cache.decode_image(folder / name, 37), _reference(folder / name, 37)), name
    jpeg = cache.decode_image(folder / "train_001.jpg", 37)  # draft mode decodes JPEGs differently, not worse
    assert jpeg.shape == (37, 37) and np.abs(jpeg.astype(int) - _reference(folder / "train_001.jpg", 37)).mean() < 3


def test_build_then_reuse_without_decoding(tmp_path, monkeypatch, counting_decoder):
    split = _write_images(tmp_path / "images")
    first = cache.cache_split(split, SIDE, tmp_path / "cache", workers=2, progress=False)
    assert sorted(counting_decoder) == sorted(p.name for p in split.paths) and first.decoded == 6
    assert first.images.shape == (6, SIDE, SIDE) and first.images.dtype == np.uint8
    for row, path in zip(first.images, split.paths):
        assert np.array_equal(row, cache.decode_image(path, SIDE))

    def must_not_decode(path, side):
        raise AssertionError(f"decoded {path} although it is cached")

    monkeypatch.setattr(cache, "decode_image", must_not_decode)
    second = cache.cache_split(split, SIDE, tmp_path / "cache", workers=0, progress=False)
    assert second.decoded == 0 and second.split.paths == split.paths and not second.split.skipped
    assert np.array_equal(first.images, second.images)


def test_a_changed_file_is_decoded_again_alone(tmp_path, counting_decoder):
    split = _write_images(tmp_path / "images")
    before = cache.cache_split(split, SIDE, tmp_path / "cache", workers=0, progress=False)
    counting_decoder.clear()
    changed = split.paths[4]
    Image.fromarray(np.full((30, 40), 250, dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    after = cache.cache_split(split, SIDE, tmp_path / "cache", workers=0, progress=False)
    assert counting_decoder == [changed.name] and after.decoded == 1
    assert (after.images[4] == 250).all() and not (before.images[4] == 250).all()
    assert np.array_equal(np.delete(after.images, 4, 0), np.delete(before.images, 4, 0))


def test_another_resolution_is_another_cache(tmp_path, counting_decoder):
    split = _write_images(tmp_path / "images")
    cache.cache_split(split, SIDE, tmp_path / "cache", workers=0, progress=False)
    bigger = cache.cache_split(split, SIDE + 8, tmp_path / "cache", workers=0, progress=False)
    assert bigger.decoded == 6 and bigger.images.shape == (6, SIDE + 8, SIDE + 8) and len(counting_decoder) == 12


def test_undecodable_files_are_skipped_not_fatal(tmp_path, monkeypatch):
    split = _write_images(tmp_path / "images")
    broken = split.paths[2]
    real = cache.decode_image

    def decode(path, side):
        if path == broken:
            raise OSError("broken data")
        return real(path, side)

    monkeypatch.setattr(cache, "decode_image", decode)
    result = cache.cache_split(split, SIDE, tmp_path / "cache", workers=2, progress=False)
    assert broken not in result.split.paths and len(result.split) == 5 and len(result.images) == 5
    assert result.split.labels == [label for path, label in zip(split.paths, split.labels) if path != broken]
    assert [(path, "broken data" in why) for path, why in result.split.skipped] == [(broken, True)]
    monkeypatch.setattr(cache, "decode_image", real)
    assert len(cache.cache_split(split, SIDE, tmp_path / "cache", workers=0, progress=False).split) == 6


def test_an_unwritable_cache_costs_only_the_reuse(tmp_path):
    split = _write_images(tmp_path / "images")
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("a file where the cache folder should be")
    result = cache.cache_split(split, SIDE, not_a_folder, workers=0, progress=False)
    assert len(result.split) == 6 and result.write_error and "cache-file" in result.write_error


def test_cache_is_the_default_and_the_flag_turns_it_off(synthetic_root, tmp_path, monkeypatch):
    parser = build_parser()
    assert parser.parse_args(["train", "resnet50_full"]).cache is True
    args = parser.parse_args(["train", "resnet50_full", "--no-cache", "--cache-dir", str(tmp_path)])
    assert args.cache is False and args.cache_dir == str(tmp_path)
    split = _write_images(tmp_path / "images")
    prep = preprocessing("resnet50", 32)
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "default-cache"))
    experiment = get_experiment("resnet50_full", image_size=32)
    dataset, kept, _ = build_dataset(split, experiment, prep, Runtime.create("cpu", cache=False, progress=False), True)
    assert isinstance(dataset, XRayDataset) and kept is split and not (tmp_path / "default-cache").exists()
    dataset, kept, info = build_dataset(split, experiment, prep, Runtime.create("cpu", progress=False), True)
    assert len(dataset) == 6 and info["decoded"] == 6 and (tmp_path / "default-cache").is_dir()
    assert dataset.inputs.shape == (6, 1, cache_side(32, prep["resize"]), cache_side(32, prep["resize"]))
