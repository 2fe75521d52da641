"""Near-duplicate images by their pixels: the same radiograph re-encoded, resized, slightly cropped or
with other brightness and contrast, which a hash of the file bytes cannot see.

Each decoded square (from the image cache) is reduced to a 64 x 64 thumbnail, from which ten views are
resampled at 32 x 32: the whole square, and the square zoomed by 6% or shifted by 3% (what a crop of a
few percent does to the cached center square). A 64-bit perceptual hash of every view (signs of the
8 x 8 lowest DCT frequencies against their median) finds candidate pairs: any view of one image within
``MAX_HASH_BITS`` of the other's whole square. A candidate is confirmed when the Pearson correlation of
the best-aligned pair of views reaches ``MIN_CORRELATION``; correlation ignores brightness and contrast.
Both thresholds were chosen from measurements (docs/robustness.md): planted copies of real radiographs
score 0.967 or more, distinct radiographs of the sample at most 0.963 (follow-ups of one patient).
"""

from __future__ import annotations

import numpy as np
from scipy.fft import dctn
from scipy.ndimage import gaussian_filter1d

THUMBNAIL = 64
VIEW = 32
ZOOM, SHIFT = 1.06, 0.03
VIEWS = ((1.0, 0.0, 0.0), (ZOOM, 0.0, 0.0), (ZOOM, SHIFT, 0.0), (ZOOM, -SHIFT, 0.0), (ZOOM, 0.0, SHIFT),
         (ZOOM, 0.0, -SHIFT), (1.0, SHIFT, 0.0), (1.0, -SHIFT, 0.0), (1.0, 0.0, SHIFT), (1.0, 0.0, -SHIFT))
MAX_HASH_BITS = 10
MIN_CORRELATION = 0.965
BLOCK = 512


def _resampler(zoom: float, shift: float) -> np.ndarray:
    """(VIEW, THUMBNAIL) matrix: smooth, then sample VIEW points linearly over the central 1/zoom, shifted."""
    centres = ((np.arange(VIEW) + 0.5) / VIEW - 0.5) / zoom + 0.5 + shift
    position = np.clip(centres * THUMBNAIL - 0.5, 0, THUMBNAIL - 1)
    low = np.floor(position).astype(int)
    weight = position - low
    matrix = np.zeros((VIEW, THUMBNAIL))
    matrix[np.arange(VIEW), low] += 1 - weight
    matrix[np.arange(VIEW), np.minimum(low + 1, THUMBNAIL - 1)] += weight
    return gaussian_filter1d(matrix, 1.0, axis=1, mode="nearest").astype(np.float32)


RESAMPLERS = [(_resampler(zoom, dy), _resampler(zoom, dx)) for zoom, dx, dy in VIEWS]


def _thumbnails(squares: np.ndarray) -> np.ndarray:
    """Block means of the uint8 squares down to THUMBNAIL px (the side must be a multiple of it)."""
    factor = squares.shape[1] // THUMBNAIL
    return squares.reshape(len(squares), THUMBNAIL, factor, THUMBNAIL, factor).mean(axis=(2, 4), dtype=np.float32)


def describe(squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the hashes of its views, ``(len(VIEWS), n)`` uint64, and the views themselves
    normalised to zero mean and unit length, ``(n, len(VIEWS), VIEW * VIEW)`` float32."""
    thumbnails = _thumbnails(squares)
    views = np.stack([rows @ thumbnails @ columns.T for rows, columns in RESAMPLERS])
    low = dctn(views, axes=(2, 3), norm="ortho")[:, :, :8, :8].reshape(len(VIEWS), len(squares), 64)
    bits = low > np.median(low[:, :, 1:], axis=2, keepdims=True)
    hashes = np.packbits(bits, axis=2).view(">u8")[:, :, 0].astype(np.uint64)
    flat = views.reshape(len(VIEWS), len(squares), -1).transpose(1, 0, 2)
    flat = flat - flat.mean(axis=2, keepdims=True)
    norms = np.linalg.norm(flat, axis=2, keepdims=True)
    return hashes, np.divide(flat, norms, out=np.zeros_like(flat), where=norms > 0)


def candidate_pairs(hashes: np.ndarray, max_bits: int = MAX_HASH_BITS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``i < j`` where a view of one is within ``max_bits`` of the other's whole square, with that
    distance; all pairs are compared in blocks of rows (numpy popcount), so memory stays small."""
    whole = hashes[0]
    found_i, found_j, found_bits = [], [], []
    for start in range(0, len(whole), BLOCK):
        rows = slice(start, start + BLOCK)
        bits = np.full((len(whole[rows]), len(whole)), 64, dtype=np.uint8)
        for view in hashes:
            np.minimum(bits, np.bitwise_count(view[rows, None] ^ whole[None, :]), out=bits)
            np.minimum(bits, np.bitwise_count(whole[rows, None] ^ view[None, :]), out=bits)
        i, j = np.nonzero(bits <= max_bits)
        keep = start + i < j
        found_i.append(start + i[keep])
        found_j.append(j[keep])
        found_bits.append(bits[i[keep], j[keep]])
    return tuple(np.concatenate(found) if found else np.zeros(0, int) for found in (found_i, found_j, found_bits))


def correlations(views: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """For each pair, the best Pearson correlation between a view of one image and the other's whole square.
    Grouped by the image whose views are used, so each partner contributes only its whole square."""
    source, partner = np.concatenate([i, j]), np.concatenate([j, i])
    order = np.argsort(source, kind="stable")
    scores = np.empty(len(source), dtype=np.float32)
    bounds = np.flatnonzero(np.diff(source[order])) + 1
    for group in np.split(order, bounds) if len(order) else []:
        scores[group] = (views[source[group[0]]] @ views[partner[group], 0].T).max(axis=0)
    return np.maximum(scores[: len(i)], scores[len(i):])


def near_duplicate_pairs(
    hashes: np.ndarray, views: np.ndarray, max_bits: int = MAX_HASH_BITS, min_correlation: float = MIN_CORRELATION
) -> list[tuple[int, int, int, float]]:
    """Confirmed pairs ``(i, j, hash bits apart, correlation)`` of images that show the same picture."""
    i, j, bits = candidate_pairs(hashes, max_bits)
    scores = correlations(views, i, j)
    keep = scores >= min_correlation
    return [(int(a), int(b), int(d), round(float(r), 4)) for a, b, d, r in zip(i[keep], j[keep], bits[keep], scores[keep])]
