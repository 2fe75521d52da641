"""The benchmark's data: a Kaggle-sized training set of Kaggle-resolution JPEGs, made from a source folder.

Decoding then costs what it costs on the real data (jtiptj/chest-xray-pneumoniacovid19tuberculosis), which
cannot be downloaded on the GPU machine: every image is a source image of its class, upscaled and re-encoded.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from cxr.data.dataset import scan_split
from cxr.data.layout import SPLITS, find_split_root
from cxr.data.layout import CLASSES

# Kaggle jtiptj/chest-xray-pneumoniacovid19tuberculosis: train 6,326 and test 771 images (val: 38).
KAGGLE_TRAIN = {"COVID19": 460, "NORMAL": 1341, "PNEUMONIA": 3875, "TUBERCULOSIS": 650}
KAGGLE_TEST = {"COVID19": 106, "NORMAL": 234, "PNEUMONIA": 390, "TUBERCULOSIS": 41}
KAGGLE_FOLDERS = {"TUBERCULOSIS": "TURBERCULOSIS"}


def source_images(source: Path) -> dict[str, list[Path]]:
    """Every image of the source dataset (all its splits), per class."""
    root = find_split_root(source)
    if root is None:
        raise SystemExit(f"error: no train/ and test/ folders under {str(source)!r}; pass --source DIR "
                         "(a Kaggle-layout folder such as device_data/cxr-sample)")
    per_class: dict[str, list[Path]] = {name: [] for name in CLASSES}
    for split in SPLITS:
        if (root / split).is_dir():
            found = scan_split(root, split)  # unusable source files are left out
            for path, label in zip(found.paths, found.labels):
                per_class[CLASSES[label]].append(path)
    return per_class


def scaled_counts(kaggle: dict[str, int], images: int, minimum: int) -> dict[str, int]:
    """Kaggle's counts per class scaled to ``images`` training images, so a smaller set keeps the proportions."""
    return {name: max(minimum, round(count * images / sum(KAGGLE_TRAIN.values()))) for name, count in kaggle.items()}


def _write_upscaled(job: tuple[Path, Path, int]) -> int:
    """One source image upscaled so its shorter side is ``side`` and saved as JPEG (quality 90)."""
    source, target, side = job
    if target.exists():
        return target.stat().st_size
    with Image.open(source) as image:
        image = image.convert("L")
        scale = side / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    temporary = target.with_name(f".{target.name}.tmp")  # hidden: a scan never lists a half-written file
    image.save(temporary, "JPEG", quality=90)
    os.replace(temporary, target)
    return target.stat().st_size


def _upscale_jobs(sources: dict[str, list[Path]], root: Path, images: int,
                  size: int) -> tuple[list[tuple[Path, Path, int]], dict[str, dict[str, int]]]:
    """(source, target, shorter side) for every file of both splits, and the counts per split and class."""
    rng = np.random.default_rng(0)
    jobs, counts, used = [], {}, set()
    for split, kaggle, minimum in (("train", KAGGLE_TRAIN, 10), ("test", KAGGLE_TEST, 3)):
        counts[split] = scaled_counts(kaggle, images, minimum)
        for name, count in counts[split].items():
            folder = root / split / KAGGLE_FOLDERS.get(name, name)
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                source_path = sources[name][index % len(sources[name])]
                side = int(round(size * rng.uniform(0.75, 1.25)))
                while (source_path, side) in used:  # a source reused at the same size would repeat a file
                    side += 1
                used.add((source_path, side))
                jobs.append((source_path, folder / f"{name.lower()}_{index:05d}.jpg", side))
    return jobs, counts


def build_kaggle_sized(source: Path, out: Path, images: int, size: int, workers: int) -> dict[str, Any]:
    """Write (or reuse) ``out/kaggle-sized-<images>-<size>px/{train,test}/<CLASS>/*.jpg``: each image a
    source image of its class, upscaled to a shorter side drawn from [0.75, 1.25] x ``size`` (a different
    size per copy, so no two files are identical)."""
    root = out / f"kaggle-sized-{images}-{size}px"
    marker = root / "dataset.json"
    if marker.exists():
        return {**json.loads(marker.read_text()), "reused": True}
    started = time.perf_counter()
    sources = source_images(source)
    empty = [name for name, paths in sources.items() if not paths]
    if empty:
        raise SystemExit(f"error: {str(source)!r} has no images of {', '.join(empty)}")
    jobs, counts = _upscale_jobs(sources, root, images, size)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        sizes = list(tqdm(pool.map(_write_upscaled, jobs), total=len(jobs), desc="build data", unit="img"))
    info = {
        "root": str(root),
        "counts": counts,
        "source": str(source),
        "source_images": sum(len(paths) for paths in sources.values()),
        "shorter_side_px": [min(job[2] for job in jobs), max(job[2] for job in jobs)],
        "mean_file_kib": round(float(np.mean(sizes)) / 1024, 1),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    marker.write_text(json.dumps(info, indent=2))
    return {**info, "reused": False}
