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
image reaches the model with bone bright. A NaN or infinite value has no grey level: the file is refused.

What a file costs is bounded before it is decoded: every format shares PIL's pixel limit (DICOM per frame,
from its header; a deflated DICOM's inflated size is counted first), only a DICOM's first frame is read,
a JPEG of more than ``MAX_JPEG_SCANS`` scans is refused from its bytes, and more than 8 bits are mapped to 8
a band of rows at a time. The peak is the decoded source plus one 8-bit copy (docs/robustness.md).
"""

from __future__ import annotations

import math
import os
import zlib
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
# A progressive JPEG decodes every scan over the whole image: libjpeg's progressive scripts use at most about
# a dozen, while 20,000 repeated scans (683 KB) took 186 s. Counted from the file's bytes before decoding.
MAX_JPEG_SCANS = 100
# More than 8 bits are mapped to 8 a band of rows at a time (about this many pixels each), so the float
# temporaries of the mapping stay a few MB whatever the image's size (a whole 9400 x 9400 16-bit PNG in
# float64 at once took 3 GB).
BAND_PIXELS = 2**18
# A deflated DICOM is inflated whole by pydicom before its header can be read; its inflated size is counted
# first (streaming, nothing kept) and refused beyond what the largest allowed frame could need.
INFLATE_STEP = 2**20
EXIF_ORIENTATION = 0x0112


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


def max_pixels() -> int:
    """The pixel limit every format shares: PIL's ``Image.MAX_IMAGE_PIXELS`` (89.5 Mpixel), read when used."""
    return int(Image.MAX_IMAGE_PIXELS or 2**62)


def refuse_non_finite(values: np.ndarray) -> None:
    """A NaN or infinite pixel has no grey level: refuse the file rather than let it turn the range (and so
    the whole image) black. One rule for every floating-point source (float TIFF, LUT'd DICOM)."""
    if values.dtype.kind in "fc" and not bool(np.isfinite(values).all()):
        raise ImageReadError("pixel values that are not numbers (NaN or infinity); refused rather than "
                             "decoded to a blank image")


def scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """The one rule from more than 8 bits to 8: ``low`` -> 0, ``high`` -> 255, linear, clipped, rounded."""
    refuse_non_finite(values)
    if not high > low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _inflated_size_at_most(path: str | os.PathLike, offset: int, limit: int) -> bool:
    """Whether the deflate stream from ``offset`` on inflates to at most ``limit`` bytes; counted in steps of
    ``INFLATE_STEP`` (nothing kept), so an 875 KB file that inflates to 900 MB costs 1 MB to refuse."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(INFLATE_STEP):
            while chunk:
                total += len(inflater.decompress(chunk, INFLATE_STEP))
                if total > limit:
                    return False
                chunk = inflater.unconsumed_tail
            if inflater.eof:
                break
    return True


def _refuse_large_deflate(path: str | os.PathLike) -> bool:
    """Refuse a deflated DICOM that inflates beyond twice the largest allowed 16-bit frame; True if deflated."""
    import pydicom
    from pydicom.filereader import read_preamble, _read_file_meta_info

    with open(path, "rb") as handle:
        read_preamble(handle, False)
        meta = _read_file_meta_info(handle)
        offset = handle.tell()
    if meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return False
    limit = 4 * max_pixels()
    if not _inflated_size_at_most(path, offset, limit):
        raise ImageReadError(f"too large (a deflated DICOM inflating to more than {limit / 2**20:.3g} MB)")
    return True


def _refuse_dicom_size(ds: Any) -> None:
    """The same pixel limit as every other format, per frame, from the header: only the first frame is
    decoded, so the other frames cost nothing."""
    columns, rows = int(ds.Columns), int(ds.Rows)
    _refuse_shape(columns, rows)
    if columns * rows > max_pixels():
        raise ImageReadError(f"too large (image of {columns} x {rows} pixels exceeds the limit of "
                             f"{max_pixels()} pixels)")


def _dataset(path: str | os.PathLike) -> Any:
    """The DICOM header (a ``pydicom.Dataset`` whose pixel data of a plain file is left on disk), or why
    there is none usable: refused from the header before any pixel is read."""
    import pydicom  # here, not on import: bare GPU machines without pydicom still read JPEG and PNG
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import get_decoder

    try:
        deflated = _refuse_large_deflate(path)
        ds = pydicom.dcmread(path, defer_size=None if deflated else "64 KB")
    except InvalidDicomError:  # only DICOM files with the standard preamble (Part 10) are read
        raise ImageReadError("not a DICOM file") from None
    except ImageReadError:
        raise
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError, zlib.error) as error:
        raise ImageReadError(f"unreadable DICOM ({type(error).__name__}: {error})") from None
    if "PixelData" not in ds or "Rows" not in ds:
        raise ImageReadError("DICOM file without an image (no pixel data)")
    _refuse_dicom_size(ds)
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
    ds = _dataset(path)
    mode = f"DICOM {ds.get('PhotometricInterpretation', '')} {ds.get('BitsStored', '?')}-bit"
    return int(ds.Columns), int(ds.Rows), mode


def _first_frame(path: str | os.PathLike, ds: Any) -> np.ndarray:
    """Only the first frame's pixels: read from the file (pydicom seeks to it), not the whole pixel data."""
    from pydicom.pixels import pixel_array
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    deflated = ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian  # inflated in memory
    try:
        return pixel_array(ds if deflated else path, index=0)
    except Exception as error:  # each pixel-data plugin raises its own types for damaged data
        raise ImageReadError(f"cannot decode the DICOM pixel data ({type(error).__name__}: {error})") from None


def _bands(height: int, width: int) -> list[slice]:
    step = max(1, BAND_PIXELS // max(1, width))
    return [slice(top, min(height, top + step)) for top in range(0, height, step)]


def _dicom_to_uint8(pixels: np.ndarray, ds: Any) -> np.ndarray:
    """Modality LUT, then VOI LUT or window, then the one rule to 8 bits, ``MONOCHROME1`` mirrored; a band of
    rows at a time (every step maps each pixel on its own), so the float copies stay a few MB."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    windowed = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    bands = _bands(*pixels.shape[:2])

    def values(band: slice) -> np.ndarray:
        mapped = apply_modality_lut(pixels[band], ds)
        return np.asarray(apply_voi_lut(mapped, ds) if windowed else mapped, dtype=np.float64)

    if windowed:
        low, high = apply_voi_lut(VOI_EXTREMES, ds)  # what the darkest and brightest input become
    elif apply_modality_lut(pixels[:1], ds).dtype == np.uint8:  # 8-bit data without a VOI: used as stored
        low, high = 0, 255
    else:
        low, high = _value_range(values(band) for band in bands)
    low, high = min(low, high), max(low, high)
    sign = -1.0 if ds.get("PhotometricInterpretation") == "MONOCHROME1" else 1.0  # white is zero: mirrored
    out = np.empty(pixels.shape[:2], dtype=np.uint8)
    for band in bands:
        out[band] = scale_to_uint8(sign * values(band), *sorted((sign * low, sign * high)))
    return out


def read_dicom(path: str | os.PathLike) -> Image.Image:
    """The first frame of a DICOM file as 8-bit grayscale: modality LUT, VOI LUT or window, the module's
    scaling rule, ``MONOCHROME1`` inverted; colour (RGB/YBR) files through PIL's luminance. Peak memory:
    the first frame as stored, its 8-bit copy and a band's float temporaries."""
    ds = _dataset(path)
    pixels = _first_frame(path, ds)
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        top = 2 ** int(ds.BitsStored) - 1
        out = np.empty(pixels.shape[:2], dtype=np.uint8)
        for band in _bands(*pixels.shape[:2]):
            rgb = Image.fromarray(scale_to_uint8(pixels[band], 0, top), mode="RGB")
            out[band] = np.asarray(rgb.convert("L"))
        return _image_of(out)
    return _image_of(_dicom_to_uint8(pixels, ds))


def _image_of(pixels: np.ndarray) -> Image.Image:
    """An ``L`` image over the uint8 array's own memory (``Image.fromarray`` would copy it)."""
    height, width = pixels.shape
    return Image.frombuffer("L", (width, height), np.ascontiguousarray(pixels), "raw", "L", 0, 1)


def _value_range(bands: Any) -> tuple[float, float]:
    """The minimum and maximum over an iterable of arrays, refusing NaN or infinity."""
    low, high = math.inf, -math.inf
    for values in bands:
        refuse_non_finite(values)
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    return low, high


def _high_depth_to_uint8(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float image mapped onto 0-255 by its own minimum and maximum, a band of rows at
    a time: the decoded source plus its 8-bit copy plus a band's temporaries, never a float64 copy of it."""
    width, height = image.size
    bands = _bands(height, width)

    def values(band: slice) -> np.ndarray:
        return np.asarray(image.crop((0, band.start, width, band.stop)))

    low, high = _value_range(values(band) for band in bands)
    out = np.empty((height, width), dtype=np.uint8)
    for band in bands:
        out[band] = scale_to_uint8(values(band), low, high)
    return _image_of(out)


def jpeg_scans(path: str | os.PathLike) -> int:
    """How many start-of-scan markers (FF DA) a JPEG holds, counted from its bytes without decoding: inside
    entropy-coded data every FF byte is followed by 00 or a restart code, so the count is exact apart from
    an embedded thumbnail's few scans."""
    count, previous = 0, b""
    with open(path, "rb") as handle:
        while chunk := handle.read(INFLATE_STEP):
            count += (previous + chunk).count(b"\xff\xda") - previous.count(b"\xff\xda")
            previous = chunk[-1:]
    return count


def check_jpeg_scans(path: str | os.PathLike) -> str | None:
    """Why a JPEG would take too long to decode (more than ``MAX_JPEG_SCANS`` scans), or None."""
    scans = jpeg_scans(path)
    if scans > MAX_JPEG_SCANS:
        return (f"a JPEG of {scans} scans (more than {MAX_JPEG_SCANS}; a progressive JPEG has about a dozen): "
                "decoding it would take minutes")
    return None


def open_8bit(path: str | os.PathLike, draft_side: int | None = None) -> Image.Image:
    """Any supported file as an 8-bit ``L`` or ``RGB`` image, EXIF orientation applied. ``draft_side``
    lets libjpeg decode a JPEG at a smaller scale (DCT domain) that stays >= ``draft_side`` on both axes."""
    if is_dicom(path):
        return read_dicom(path)
    with Image.open(path) as image:
        _refuse_shape(*image.size)  # before any pixel is decoded
        if image.format == "JPEG":
            slow = check_jpeg_scans(path)
            if slow is not None:
                raise ImageReadError(slow)
            if draft_side:
                image.draft("L", (draft_side, draft_side))
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even an upright image
            image = ImageOps.exif_transpose(image)
        image.load()  # decoded here, while the file is open
        if image.mode in HIGH_DEPTH_MODES:
            return _high_depth_to_uint8(image)
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
