"""Decode every image once: a decoded-image cache on disk, shared by epochs, runs and experiments.

Each image is decoded by :func:`cxr.data.imageio.decode_image` (JPEG in draft mode, which lets libjpeg skip
most of the work for a small target; DICOM through its LUTs), as 8-bit grayscale with its shorter side
resized to ``side`` and center-cropped to a ``side`` x ``side`` square, then stored as raw bytes in its
own file. The file name is a hash of the image's content (:func:`cxr.common.fileid.content_digest`) and ``side``,
so a changed image simply misses the cache and is decoded again while the others are reused; two runs may
build the same cache at once (every entry is written to a temporary file and renamed). Chest X-rays are
grayscale: one channel is stored and expanded to three on the device, a third of the memory of RGB.
Decoding runs on a thread pool: Pillow releases the GIL while it decodes and resizes.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from cxr.common.progress import tqdm

from cxr.data.dataset import Split
from cxr.common.fileid import content_digest
from cxr.data.imageio import decode_image
from cxr.common.runtime import default_cache_dir

# 2: more than 8 bits rounded (imageio.scale_to_uint8); 3: only the region under the crop resampled (within a level of 2)
FORMAT_VERSION = 3


def entry_path(cache_dir: Path, path: Path, side: int) -> Path:
    """Where the decoded copy of ``path`` lives: named by the file's content, so an image replaced in place
    (even with the same size and modification time) misses the cache, and copies of one file share it."""
    key = f"{FORMAT_VERSION}\0{side}\0{content_digest(path)}"
    digest = hashlib.sha1(key.encode()).hexdigest()
    return cache_dir / f"v{FORMAT_VERSION}-{side}px" / digest[:2] / f"{digest}.u8"


def _read_entry(entry: Path, out: np.ndarray) -> bool:
    """Fill ``out`` from a cache entry; False when it is missing or has the wrong size."""
    try:
        with open(entry, "rb") as handle:
            return handle.readinto(memoryview(out).cast("B")) == out.nbytes and not handle.read(1)
    except OSError:
        return False


def _write_entry(entry: Path, pixels: np.ndarray) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    temporary = entry.with_name(f".{entry.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        temporary.write_bytes(pixels.tobytes())
        os.replace(temporary, entry)
    finally:
        temporary.unlink(missing_ok=True)


def default_workers() -> int:
    """Every core this process may use: decoding releases the GIL, so threads scale."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class CachedSplit:
    """A split's images as one ``(N, side, side)`` uint8 array, with the split of the images it holds
    (files that failed to decode are left out and listed in ``split.skipped``)."""

    images: np.ndarray
    split: Split
    side: int
    decoded: int
    seconds: float
    write_error: str | None = None


def _run(task: Callable[[int], object], indices: list[int], workers: int, bar: tqdm | None) -> list:
    """``task`` over ``indices`` on a thread pool (in this thread when ``workers`` is 0)."""
    results = []
    if workers == 0:
        for index in indices:
            results.append(task(index))
            if bar is not None:
                bar.update()
        return results
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(task, indices):
            results.append(result)
            if bar is not None:
                bar.update()
    return results


def _entries(split: Split, cache_dir: Path, side: int, workers: int, failures: dict[int, str]) -> list[Path | None]:
    """Each image's cache entry, found on the pool (it reads the file for its digest, like decoding); a file
    that vanished or became unreadable after scanning gets None and its reason in ``failures``."""
    def locate(index: int) -> Path | None:
        try:
            return entry_path(cache_dir, Path(split.paths[index]), side)
        except OSError as error:
            failures[index] = f"unreadable ({error})"
            return None

    return _run(locate, list(range(len(split))), workers, None)


def cache_split(
    split: Split,
    side: int,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    description: str = "decode",
) -> CachedSplit:
    """Every image of ``split`` as a ``side`` x ``side`` uint8 square, read from the cache under
    ``cache_dir`` (default :func:`default_cache_dir`) or decoded in parallel and added to it.

    A file that cannot be decoded is skipped (listed in ``result.split.skipped``), never fatal; a cache
    folder that cannot be written only costs the reuse (``result.write_error`` says why).
    """
    started = time.perf_counter()
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    workers = default_workers() if workers is None else workers
    images = np.empty((len(split), side, side), dtype=np.uint8)
    failures: dict[int, str] = {}
    entries = _entries(split, cache_dir, side, workers, failures)

    def read(index: int) -> bool:
        return entries[index] is not None and _read_entry(entries[index], images[index])

    candidates = [i for i, entry in enumerate(entries) if entry is not None]
    cached = _run(read, candidates, workers, None)
    missing = [i for i, hit in zip(candidates, cached) if not hit]
    write_errors: list[str] = []

    def decode(index: int) -> None:
        try:
            images[index] = decode_image(split.paths[index], side)
        except Exception as error:  # Pillow raises many types for malformed files; all mean "skip it"
            failures[index] = f"cannot decode ({type(error).__name__}: {error})"
            return
        try:
            _write_entry(entries[index], images[index])
        except OSError as error:
            write_errors.append(str(error))

    if missing:
        bar = tqdm(total=len(missing), desc=description, unit="img", leave=False, disable=not progress)
        _run(decode, missing, workers, bar)
        bar.close()
    kept = [i for i in range(len(split)) if i not in failures]
    result_split = Split(
        [split.paths[i] for i in kept],
        [split.labels[i] for i in kept],
        [(Path(split.paths[i]), why) for i, why in sorted(failures.items())],
    )
    result_images = images if len(kept) == len(split) else images[kept]
    return CachedSplit(
        result_images, result_split, side, len(missing), time.perf_counter() - started,
        f"could not write the image cache in {str(cache_dir)!r} ({write_errors[0]})" if write_errors else None,
    )
