"""Measure the audit's near-duplicate thresholds and speed on real radiographs (not a test).

1. Plants changed copies of ``--planted`` images of the dataset (JPEG quality 70, 16-bit PNG, half size,
   5% cropped from the centre and from one side, brightened 1.3x, contrast 1.4x, gamma 0.7; and, beyond
   what the audit promises, 10% cropped and rotated 2 degrees) and prints, per kind, the largest hash
   distance and the smallest correlation with the original.
2. Prints how many pairs of the dataset's own images pass the hash stage and their best correlations.
3. Times the pair search for ``--scale`` images: the dataset's descriptors repeated.

    uv run python benchmarks/near_duplicates.py --data-dir ../shared/data/cxr-sample
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from cxr.audit import near_duplicates as nd
from cxr.audit.data_audit import AUDIT_SIDE
from cxr.data.cache import cache_split, decode_image
from cxr.data.dataset import scan_split
from cxr.data.layout import SPLITS, locate_dataset

KINDS = ("jpeg q70", "16-bit png", "half size", "crop 5% centre", "crop 5% side", "brightness 1.3",
         "contrast 1.4", "gamma 0.7", "crop 10% centre", "rotate 2 deg")


def changed(path, kind: str, folder: Path, index: int) -> Path:
    image = Image.open(path).convert("L")
    w, h = image.size
    image = {
        "jpeg q70": image, "16-bit png": Image.fromarray(np.asarray(image).astype(np.uint16) * 257),
        "half size": image.resize((w // 2, h // 2), Image.Resampling.BILINEAR),
        "crop 5% centre": image.crop((w // 40, h // 40, w - w // 40, h - h // 40)),
        "crop 5% side": image.crop((w // 20, 0, w, h)),
        "brightness 1.3": ImageEnhance.Brightness(image).enhance(1.3),
        "contrast 1.4": ImageEnhance.Contrast(image).enhance(1.4),
        "gamma 0.7": Image.fromarray((255 * (np.asarray(image) / 255.0) ** 0.7).astype(np.uint8)),
        "crop 10% centre": image.crop((w // 20, h // 20, w - w // 20, h - h // 20)),
        "rotate 2 deg": image.rotate(2, resample=Image.Resampling.BILINEAR),
    }[kind]
    target = folder / f"{index}.{'jpg' if kind == 'jpeg q70' else 'png'}"
    image.save(target, quality=70) if kind == "jpeg q70" else image.save(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--planted", type=int, default=80)
    parser.add_argument("--scale", type=int, default=7000)
    args = parser.parse_args()
    root = locate_dataset(args.data_dir)
    splits = [cache_split(scan_split(root, name), AUDIT_SIDE, progress=False) for name in SPLITS if (root / name).is_dir()]
    squares = np.concatenate([s.images for s in splits])
    paths = [p for s in splits for p in s.split.paths]
    started = time.perf_counter()
    hashes, views = nd.describe(squares)
    print(f"{len(squares)} images described in {time.perf_counter() - started:.2f} s")

    picked = np.random.default_rng(0).choice(len(paths), min(args.planted, len(paths)), replace=False)
    print(f"\nplanted copies of {len(picked)} images: largest hash distance, smallest and 10th-percentile correlation")
    for kind in KINDS:
        with tempfile.TemporaryDirectory() as folder:
            copies = [decode_image(changed(paths[k], kind, Path(folder), k), AUDIT_SIDE) for k in picked]
        copies_h, copies_v = nd.describe(np.stack(copies))
        both_h = np.concatenate([hashes[:, picked], copies_h], axis=1)
        both_v = np.concatenate([views[picked], copies_v])
        first, second = np.arange(len(picked)), np.arange(len(picked)) + len(picked)
        bits = np.min([np.minimum(np.bitwise_count(v[first] ^ both_h[0][second]), np.bitwise_count(both_h[0][first] ^ v[second]))
                       for v in both_h], axis=0)
        scores = nd.correlations(both_v, first, second)
        found = np.mean((bits <= nd.MAX_HASH_BITS) & (scores >= nd.MIN_CORRELATION))
        print(f"  {kind:16s} bits <= {bits.max():2d}  correlation >= {scores.min():.3f} "
              f"(p10 {np.percentile(scores, 10):.3f})  found {found:.0%}")

    started = time.perf_counter()
    i, j, _ = nd.candidate_pairs(hashes)
    scores = nd.correlations(views, i, j)
    print(f"\n{len(i)} of {len(paths) * (len(paths) - 1) // 2} pairs within {nd.MAX_HASH_BITS} bits "
          f"({time.perf_counter() - started:.2f} s); best correlations:")
    for k in np.argsort(scores)[::-1][:6]:
        print(f"  {scores[k]:.3f}  {paths[i[k]].relative_to(root)}  {paths[j[k]].relative_to(root)}")

    repeat = -(-args.scale // len(paths))
    big_h, big_v = np.tile(hashes, repeat)[:, :args.scale], np.tile(views, (repeat, 1, 1))[:args.scale]
    started = time.perf_counter()
    i, j, _ = nd.candidate_pairs(big_h)
    searched = time.perf_counter() - started
    nd.correlations(big_v, i, j)
    print(f"\n{args.scale} images (the descriptors repeated {repeat}x): hash search {searched:.2f} s, "
          f"{len(i)} candidates confirmed in {time.perf_counter() - started - searched:.2f} s")


if __name__ == "__main__":
    main()
