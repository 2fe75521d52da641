"""A tiny synthetic dataset in the Kaggle layout, for tests and the notebooks' smoke mode.

Each class gets a different simple pattern so a model can learn something in one epoch, drawn over a
random smooth structure of each image's own, so that two images are never near-duplicates; the folder
also holds the awkward files real downloads contain (corrupt, empty, truncated, non-image, grayscale,
RGBA and 16-bit images) and the Kaggle spelling ``TURBERCULOSIS``. :func:`write_dicom` writes DICOM files
for tests and examples.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from cxr.data.layout import CLASSES

FOLDER_NAMES = {"TUBERCULOSIS": "TURBERCULOSIS"}
DEFAULT_COUNTS = {"train": 12, "val": 3, "test": 4}


def _pattern(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A grayscale image: the class sets a bright blob's position and stripes, drawn over smooth random
    structure that differs from image to image (as anatomy does between patients)."""
    y, x = np.mgrid[0:size, 0:size] / size
    centres = [(0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7)]
    cy, cx = centres[label % len(centres)]
    blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.02)
    stripes = 0.15 * np.sin(2 * np.pi * (label + 1) * 3 * x)
    structure = gaussian_filter(rng.normal(0, 1, (size, size)), size / 8, mode="wrap")
    structure *= 0.15 / structure.std()
    noise = rng.normal(0, 0.05, (size, size))
    return (np.clip(0.4 + 0.4 * blob + stripes + structure + noise, 0, 1) * 255).astype(np.uint8)


def write_synthetic_dataset(
    root: str | Path,
    counts: dict[str, int] | None = None,
    size: int = 48,
    bad_files: bool = True,
    seed: int = 0,
) -> Path:
    """Write ``root/train|val|test/<CLASS>/*.png|jpg`` and return ``root``.

    With ``bad_files`` the train split also gets one corrupt, one empty, one truncated JPEG and one
    text file (all must be skipped), plus a grayscale, an RGBA and a 16-bit PNG (all must load).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = counts or DEFAULT_COUNTS
    for split, per_class in counts.items():
        for label, name in enumerate(CLASSES):
            folder = root / split / FOLDER_NAMES.get(name, name)
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                pixels = _pattern(label, size, rng)
                if index % 2:
                    Image.fromarray(pixels).convert("RGB").save(folder / f"{split}_{index:03d}.jpg", quality=90)
                else:
                    Image.fromarray(pixels).save(folder / f"{split}_{index:03d}.png")
    if bad_files:
        folder = root / "train" / CLASSES[1]
        pixels = _pattern(1, size, rng)  # the files that must load get pictures of their own (no near-duplicates)
        (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
        (folder / "empty.png").write_bytes(b"")
        (folder / "notes.txt").write_text("not an image")
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        Image.fromarray(_pattern(1, size, rng)).convert("RGBA").save(folder / "rgba.png")
        Image.fromarray(_pattern(1, size, rng), mode="L").save(folder / "gray.png")
        Image.fromarray(_pattern(1, size, rng).astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    return root


def write_dicom(
    path: str | Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
    window: tuple[float, float] | None = None, rescale: tuple[float, float] | None = None, rle: bool = False,
) -> Path:
    """Write a single-frame grayscale DICOM radiograph (uint8 or uint16 ``pixels``, stored as given) with
    pydicom, optionally with a window (centre, width), a rescale (intercept, slope) or RLE compression."""
    import pydicom
    from pydicom import uid

    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = uid.DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 1, photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleIntercept, ds.RescaleSlope = rescale
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if rle:
        ds.compress(uid.RLELossless)
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def _cue_image(label: int, width: int, height: int, cue: str | None, rng: np.random.Generator) -> np.ndarray:
    """Smooth random structure; the class shows only as a blob inside one of the lung ellipses of the
    framed square (top or bottom of the left or right lung); ``cue="border"`` adds a class-dependent
    brightness outside both; ``cue="border_only"`` adds it only beyond a margin of 0.04 around them (so
    resizing the lung field's edge lets none of it in) and draws the blob at a random one of the four
    places, so the lung field says nothing of the class (the class-dependent size of ``"aspect"`` is
    the caller's)."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    y, x = (np.mgrid[0:height, 0:width] - np.array([top, left])[:, None, None] + 0.5) / side
    place = int(rng.integers(0, 4)) if cue == "border_only" else label
    cx, cy = (0.31, 0.69)[place % 2], (0.38, 0.62)[place // 2 % 2]
    blob = 0.35 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.004)
    structure = gaussian_filter(rng.normal(0, 1, (height, width)), side / 8, mode="wrap")
    structure *= 0.12 / structure.std()
    pixels = 0.4 + blob + structure + rng.normal(0, 0.04, (height, width))
    if cue in ("border", "border_only"):
        margin = 0.04 if cue == "border_only" else 0.0  # clear of the lung field's resized edge
        width_, height_ = 0.15 + margin, 0.3 + margin
        lungs = ((((x - 0.31) / width_) ** 2 + ((y - 0.5) / height_) ** 2 <= 1)
                 | (((x - 0.69) / width_) ** 2 + ((y - 0.5) / height_) ** 2 <= 1))
        pixels += ~lungs * (0.12 * label - 0.18)
    return (np.clip(pixels, 0, 1) * 255).astype(np.uint8)


def write_cue_dataset(root: str | Path, cue: str | None = None, counts: dict[str, int] | None = None,
                      size: int = 48, seed: int = 0) -> Path:
    """A Kaggle-layout set for the shortcut checks: the class is drawn inside the lung field only, and every
    image gets a random aspect ratio (0.8-1.25) and format (PNG or JPEG) whatever its class. ``cue``
    plants a shortcut: ``"aspect"`` gives each class its own aspect ratio (0.75, 0.9, 1.1, 1.3),
    ``"border"`` its own brightness outside the lung field, ``"border_only"`` that brightness with nothing
    of the class inside the lung field (the blob's place drawn at random)."""
    if cue not in (None, "aspect", "border", "border_only"):
        raise ValueError(f"unknown cue {cue!r}; expected None, 'aspect', 'border' or 'border_only'")
    root, rng = Path(root), np.random.default_rng(seed)
    for split, per_class in (counts or {"train": 30, "test": 15}).items():
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                ratio = (0.75, 0.9, 1.1, 1.3)[label] if cue == "aspect" else float(np.exp(rng.uniform(-0.22, 0.22)))
                width, height = (round(size * ratio), size) if ratio >= 1 else (size, round(size / ratio))
                pixels = _cue_image(label, width, height, cue, rng)
                suffix = ".png" if rng.random() < 0.5 else ".jpg"
                Image.fromarray(pixels).save(folder / f"{split}_{index:03d}{suffix}")
    return root
