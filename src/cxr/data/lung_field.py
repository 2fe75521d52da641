"""The lung field: which pixels of the framed square are the lungs, for the shortcut checks.

Geometric by default: two upright ellipses on the decoded square every model input is cut from
(:func:`cxr.data.imageio.decode_image`: shorter side resized, centre square), in fractions of its side:
centres at x = 0.31 and x = 0.69, y = 0.50, half-widths 0.15 and half-heights 0.30 (about 28% of the
square). On a posteroanterior chest X-ray framed that way they cover the two lung fields roughly; the
mediastinum between them, the shoulders, the neck, the abdomen and the corners (where labels, text and
arrows sit) fall outside. It is a prior, not a segmentation: ``--lung-masks DIR`` replaces it with one
PNG mask per image (nonzero: lung), found as ``DIR/<class folder>/<image stem>.png`` or
``DIR/<image stem>.png``, as large as its image and framed like it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from cxr.data.imageio import dicom_header, frame_square, is_dicom

# (centre x, centre y, half-width, half-height), in fractions of the framed square's side
ELLIPSES = ((0.31, 0.50, 0.15, 0.30), (0.69, 0.50, 0.15, 0.30))
NAMES_SHOWN = 5


class LungMaskError(ValueError):
    """A lung-mask folder that does not fit the images; the message names the files."""


def geometric_lung_field(side: int) -> np.ndarray:
    """The two ellipses as a ``side`` x ``side`` boolean array (True: lung field)."""
    y, x = (np.mgrid[0:side, 0:side] + 0.5) / side
    field = np.zeros((side, side), dtype=bool)
    for cx, cy, half_width, half_height in ELLIPSES:
        field |= ((x - cx) / half_width) ** 2 + ((y - cy) / half_height) ** 2 <= 1
    return field


def mask_path(image: Path, folder: Path) -> Path | None:
    """The mask of ``image`` in ``folder``: ``<class folder>/<stem>.png``, else ``<stem>.png``; None if neither exists."""
    for candidate in (folder / image.parent.name / f"{image.stem}.png", folder / f"{image.stem}.png"):
        if candidate.is_file():
            return candidate
    return None


def _image_size(path: Path) -> tuple[int, int]:
    if is_dicom(path):
        return dicom_header(path)[:2]
    with Image.open(path) as image:
        return image.size


def _listed(paths: Sequence[str]) -> str:
    more = f" and {len(paths) - NAMES_SHOWN} more" if len(paths) > NAMES_SHOWN else ""
    return ", ".join(paths[:NAMES_SHOWN]) + more


def find_lung_masks(images: Sequence[Path], folder: str | os.PathLike) -> list[Path]:
    """Each image's mask file, or :class:`LungMaskError` naming the images without one and the masks
    whose size differs from their image's (checked before any training, from the file headers)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LungMaskError(f"lung-mask folder {str(folder)!r} does not exist")
    found, missing, mismatched = [], [], []
    for image in map(Path, images):
        mask = mask_path(image, folder)
        if mask is None:
            missing.append(f"{image.parent.name}/{image.name}")
            continue
        with Image.open(mask) as opened:
            mask_size = opened.size
        if mask_size != _image_size(image):
            mismatched.append(f"{mask} ({mask_size[0]}x{mask_size[1]}, image {'x'.join(map(str, _image_size(image)))})")
        found.append(mask)
    problems = []
    if missing:
        problems.append(f"{len(missing)} image(s) have no mask ({folder}/<class>/<stem>.png or {folder}/<stem>.png): "
                        f"{_listed(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} mask(s) differ in size from their image: {_listed(mismatched)}")
    if problems:
        raise LungMaskError("; ".join(problems))
    return found


def lung_fields(images: Sequence[Path], side: int, folder: str | os.PathLike | None = None) -> np.ndarray:
    """``(N, side, side)`` boolean lung fields of the images, framed like their pixels: the geometric
    field for every image, or each image's own mask from ``folder``."""
    if folder is None:
        return np.broadcast_to(geometric_lung_field(side), (len(images), side, side))
    masks = [frame_square(Image.open(path).convert("L"), side) > 127 for path in find_lung_masks(images, folder)]
    return np.stack(masks) if masks else np.zeros((0, side, side), dtype=bool)
