"""Every file becomes a model input here, and only here: JPEG, PNG (8- or 16-bit) and DICOM.

Training, evaluation, test-time augmentation, ``cxr predict`` and Grad-CAM all call :func:`decode_image`
(through the decoded-image cache or directly), so one image gets one set of pixels whatever reads it:
8-bit grayscale, EXIF orientation applied, shorter side resized to ``side``, centre ``side`` square.

More than 8 bits become 8 by one rule, the same for every file: a linear map of a display range onto
0-255 (below it 0, above it 255, in between rounded to the nearest level). The display range of a DICOM file with a
VOI LUT or window (the first one) is that VOI's output range, so the window sets the contrast; every
other file's is its own minimum to maximum (for DICOM after the modality LUT or rescale); 8-bit data
without a VOI is used as stored, like an 8-bit PNG.
``MONOCHROME1`` (white is zero) maps its range the other way round, high to 0 and low to 255, so every
image reaches the model with bone bright.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

DICOM_EXTENSIONS = {".dcm", ".dicom"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", *DICOM_EXTENSIONS}
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
# The cache keeps 256 px for 224 px training images: the classic evaluation resize, and at least
# every pretrained weight's own resize (ResNet V2 weights use 232, ViT 256), so one cache serves all.
CACHE_RATIO = 256 / 224
# Inputs beyond any stored value (DICOM stores at most 32 bits): a VOI maps them onto its output's ends.
VOI_EXTREMES = np.array([-(2**31), 2**31 - 1], dtype=np.int64)
# Shapes no radiograph has: chest films are about square (1:1.3 at most), whole-spine or long-leg images
# reach 1:3. A thinner image is a strip or an attack (an 80,000,000 x 1 PNG is 77 KB), and one under
# 8 px holds no picture; both are refused per file, by audit, training, predict and the demo page alike.
MAX_ASPECT_RATIO = 6
MIN_SIDE = 8


class ImageReadError(ValueError):
    """The file cannot become an image; the message says why, in a few words."""


def check_shape(width: int, height: int) -> str | None:
    """Why an image of ``width`` x ``height`` pixels is refused (a shape no radiograph has), or None."""
    short, long = min(width, height), max(width, height)
    if short < MIN_SIDE:
        return f"image of {width} x {height} pixels: a side under {MIN_SIDE} px, no radiograph is that small"
    if long > MAX_ASPECT_RATIO * short:
        return (f"image of {width} x {height} pixels: aspect ratio {long / short:.3g}:1 is beyond "
                f"{MAX_ASPECT_RATIO}:1, no radiograph has that shape")
    return None


def _refuse_shape(width: int, height: int) -> None:
    reason = check_shape(width, height)
    if reason is not None:
        raise ImageReadError(reason)


def cache_side(image_size: int, resize: int | None = None) -> int:
    """Side of the decoded squares for a model of input ``image_size`` with evaluation resize ``resize``."""
    return max(resize or 0, round(image_size * CACHE_RATIO))


def is_dicom(path: str | os.PathLike) -> bool:
    """A ``.dcm``/``.dicom`` name, or the ``DICM`` marker after the 128-byte preamble."""
    if Path(path).suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """The one rule from more than 8 bits to 8: ``low`` -> 0, ``high`` -> 255, linear, clipped, rounded."""
    if not high > low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _dataset(path: str | os.PathLike) -> Any:
    """The DICOM header and raw pixel bytes (a ``pydicom.Dataset``), or why there are none usable."""
    import pydicom  # here, not on import: bare GPU machines without pydicom still read JPEG and PNG
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import get_decoder

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:  # only DICOM files with the standard preamble (Part 10) are read
        raise ImageReadError("not a DICOM file") from None
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as error:
        raise ImageReadError(f"unreadable DICOM ({type(error).__name__}: {error})") from None
    if "PixelData" not in ds or "Rows" not in ds:
        raise ImageReadError("DICOM file without an image (no pixel data)")
    _refuse_shape(int(ds.Columns), int(ds.Rows))
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is not None and syntax.is_compressed and not get_decoder(syntax).is_available:
        raise ImageReadError(f"DICOM pixel data in {syntax.name}: no decoder for it is installed "
                             f"({'; '.join(get_decoder(syntax).missing_dependencies)})")
    return ds


def check_dicom(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be used as a DICOM image, or None; reads the file but decodes no pixels."""
    try:
        _dataset(path)
    except ImageReadError as error:
        return str(error)
    return None


def dicom_header(path: str | os.PathLike) -> tuple[int, int, str]:
    """(width, height, mode) of a DICOM image from its header, e.g. ``(2048, 2500, "DICOM MONOCHROME1 12-bit")``."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    mode = f"DICOM {ds.get('PhotometricInterpretation', '')} {ds.get('BitsStored', '?')}-bit"
    return int(ds.Columns), int(ds.Rows), mode


def read_dicom(path: str | os.PathLike) -> Image.Image:
    """The first frame of a DICOM file as 8-bit grayscale: modality LUT, VOI LUT or window, the module's
    scaling rule, ``MONOCHROME1`` inverted; colour (RGB/YBR) files through PIL's luminance."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _dataset(path)
    try:
        pixels = ds.pixel_array
    except Exception as error:  # each pixel-data plugin raises its own types for damaged data
        raise ImageReadError(f"cannot decode the DICOM pixel data ({type(error).__name__}: {error})") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return Image.fromarray(scale_to_uint8(pixels, 0, 2 ** int(ds.BitsStored) - 1), mode="RGB").convert("L")
    values = apply_modality_lut(pixels, ds)
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
        low, high = apply_voi_lut(VOI_EXTREMES, ds)  # what the darkest and brightest input become
        values = apply_voi_lut(values, ds)
    elif values.dtype == np.uint8:
        low, high = 0, 255
    else:
        low, high = float(values.min()), float(values.max())
    values, low, high = np.asarray(values, dtype=np.float64), min(low, high), max(low, high)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # white is zero: the same rule, mirrored
        values, low, high = -values, -high, -low
    return Image.fromarray(scale_to_uint8(values, low, high), mode="L")


def open_8bit(path: str | os.PathLike, draft_side: int | None = None) -> Image.Image:
    """Any supported file as an 8-bit ``L`` or ``RGB`` image, EXIF orientation applied. ``draft_side``
    lets libjpeg decode a JPEG at a smaller scale (DCT domain) that stays >= ``draft_side`` on both axes."""
    if is_dicom(path):
        return read_dicom(path)
    with Image.open(path) as image:
        _refuse_shape(*image.size)  # before any pixel is decoded
        if draft_side and image.format == "JPEG":
            image.draft("L", (draft_side, draft_side))
        image = ImageOps.exif_transpose(image)
        if image.mode in HIGH_DEPTH_MODES:
            array = np.asarray(image, dtype=np.float64)
            return Image.fromarray(scale_to_uint8(array, array.min(), array.max()), mode="L")
        if image.mode == "L":
            return image
        if image.mode in ("P", "LA", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")
        return image.convert("RGB")


def frame_square(image: Image.Image, side: int) -> np.ndarray:
    """Shorter side resized to ``side`` (PIL's bilinear filter widens with the scale, so shrinking is
    antialiased), longer side centre-cropped: a ``side`` x ``side`` uint8 array. Only the source pixels the
    filter reads for the crop are copied and resampled (the same sampling grid as resizing the whole image,
    then cropping), so past the decoded source the memory is the output's, whatever the shape: resizing the
    whole image first made a 1 x 100,000 PNG a 256 x 25,600,000 intermediate (7.5 GB)."""
    width, height = image.size
    scale = side / min(width, height)
    size = (max(side, round(width * scale)), max(side, round(height * scale)))
    left, top = (size[0] - side) // 2, (size[1] - side) // 2
    box = (left * width / size[0], top * height / size[1],
           (left + side) * width / size[0], (top + side) * height / size[1])
    margin = math.ceil(max(1.0, 1 / scale)) + 1  # the filter's reach in source pixels, and one to spare
    region = (max(0, math.floor(box[0]) - margin), max(0, math.floor(box[1]) - margin),
              min(width, math.ceil(box[2]) + margin), min(height, math.ceil(box[3]) + margin))
    inner = (box[0] - region[0], box[1] - region[1], box[2] - region[0], box[3] - region[1])
    square = image.crop(region).resize((side, side), Image.Resampling.BILINEAR, box=inner)
    return np.array(square, dtype=np.uint8)  # writable: torch.from_numpy


def decode_image(path: str | os.PathLike, side: int) -> np.ndarray:
    """One file as the ``side`` x ``side`` uint8 grayscale square every model input is cut from."""
    return frame_square(open_8bit(path, side).convert("L"), side)
