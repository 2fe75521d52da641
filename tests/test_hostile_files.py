"""Hostile files (issue 31): every decode refused or bounded by one rule in cxr.imageio, per file, from the
header where it can be, with peak memory bounded whatever the file promises."""

import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid

from cxr import imageio
from cxr.data import check_image
from cxr.imageio import ImageReadError, decode_image, jpeg_scans
from cxr.predict import read_image
from cxr.synthetic import write_dicom

SIDE = 32


def _gradient(height: int = 48, width: int = 40, top: int = 4095) -> np.ndarray:
    return np.tile(np.linspace(0, top, width), (height, 1)).round().astype(np.uint16)


# 1: a float TIFF with one NaN pixel ------------------------------------------------------------------

def test_a_float_image_with_a_nan_pixel_is_refused_not_decoded_black(tmp_path):
    values = _gradient().astype(np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "clean.tif")
    values[10, 10] = np.nan
    Image.fromarray(values, mode="F").save(tmp_path / "scan.tif")
    assert decode_image(tmp_path / "clean.tif", SIDE).std() > 50  # a float image as such decodes
    with pytest.raises(ImageReadError, match="NaN or infinity"):
        decode_image(tmp_path / "scan.tif", SIDE)
    square, reason = read_image(tmp_path / "scan.tif", SIDE)  # cxr predict and the demo page: one row lost
    assert square is None and "NaN or infinity" in reason


# 11: DICOM bombs -------------------------------------------------------------------------------------

def _rewrite(path: Path, **changes) -> Path:
    ds = pydicom.dcmread(path)
    for name, value in changes.items():
        if name == "syntax":
            ds.file_meta.TransferSyntaxUID = value
        else:
            setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_dicom_promising_more_pixels_than_the_limit_is_refused_from_its_header(tmp_path):
    path = write_dicom(tmp_path / "bomb.dcm", _gradient())
    _rewrite(path, Rows=30_000, Columns=30_000, syntax=uid.DeflatedExplicitVRLittleEndian)
    reason = "too large (image of 30000 x 30000 pixels exceeds the limit of 89478485 pixels)"
    assert check_image(path) == reason
    with pytest.raises(ImageReadError, match=r"too large \(image of 30000 x 30000"):
        decode_image(path, SIDE)


def test_a_deflated_dicom_inflating_beyond_the_limit_is_refused_before_pydicom_inflates_it(tmp_path, monkeypatch):
    frames = np.stack([_gradient()] * 8)  # 8 frames of 48 x 40 x 2 bytes: 31 KB inflated
    path = write_dicom(tmp_path / "deflated.dcm", frames[0])
    _rewrite(path, NumberOfFrames=8, PixelData=frames.tobytes(), syntax=uid.DeflatedExplicitVRLittleEndian)
    assert np.array_equal(decode_image(path, SIDE), decode_image(write_dicom(tmp_path / "one.dcm", frames[0]), SIDE))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 48 * 40 * 2)  # a frame fits; 4 bytes a pixel: 15 KB < 31 KB
    assert check_image(path).startswith("too large (a deflated DICOM inflating to more than")


def test_only_the_first_frame_of_a_multi_frame_dicom_is_decoded(tmp_path, monkeypatch):
    frames = np.stack([_gradient(), 4095 - _gradient(), _gradient() // 2])
    path = write_dicom(tmp_path / "frames.dcm", frames[0])
    _rewrite(path, NumberOfFrames=3, PixelData=frames.tobytes())
    read = []
    original = imageio._first_frame
    monkeypatch.setattr(imageio, "_first_frame", lambda p, ds: read.append(original(p, ds)) or read[-1])
    assert np.array_equal(decode_image(path, SIDE), decode_image(write_dicom(tmp_path / "one.dcm", frames[0]), SIDE))
    assert read[0].shape == (48, 40)  # one frame came out of pydicom, not (3, 48, 40)


def test_a_bad_dicom_costs_its_row_and_the_good_image_is_classified(checkpoint, tmp_path):
    from cxr.predict import run_predict

    Image.fromarray(_gradient(top=255).astype(np.uint8)).save(tmp_path / "good.png")
    _rewrite(write_dicom(tmp_path / "bomb.dcm", _gradient()), Rows=30_000, Columns=30_000)
    result = run_predict(checkpoint, [tmp_path / "good.png", tmp_path / "bomb.dcm"], device="cpu", progress=False)
    assert list(result.table["file"]) == [str(tmp_path / "good.png")]
    assert [(p.name, why.split(" (")[0]) for p, why in result.failures] == [("bomb.dcm", "too large")]


# 12: a progressive JPEG of thousands of scans --------------------------------------------------------

def _many_scans(path: Path, copies: int) -> Path:
    """A progressive JPEG whose last scan is repeated ``copies`` times (libjpeg decodes every one of them)."""
    Image.fromarray(_gradient(top=255).astype(np.uint8)).save(path, progressive=True)
    data = path.read_bytes()
    last = data.rindex(b"\xff\xda")
    path.write_bytes(data[:last] + data[last:-2] * copies + data[-2:])
    return path


def test_a_jpeg_with_too_many_scans_is_refused_before_decoding(tmp_path):
    normal = _many_scans(tmp_path / "normal.jpg", 1)
    assert 2 <= jpeg_scans(normal) <= 20 and check_image(normal) is None
    slow = _many_scans(tmp_path / "slow.jpg", 200)
    assert jpeg_scans(slow) == jpeg_scans(normal) + 199
    assert check_image(slow).startswith(f"a JPEG of {jpeg_scans(slow)} scans (more than 100")
    with pytest.raises(ImageReadError, match="scans"):
        decode_image(slow, SIDE)


# 14: memory of a large 16-bit image --------------------------------------------------------------------

def test_a_16_bit_image_is_mapped_to_8_bits_in_bands(tmp_path):
    """numpy's allocations (tracemalloc sees them) stay at the 8-bit copy plus a band's temporaries: the whole
    image in float64 at once made a 9400 x 9400 16-bit PNG cost 3 GB."""
    big = np.tile(np.linspace(0, 65535, 2048), (2048, 1)).astype(np.uint16)
    Image.fromarray(big).save(tmp_path / "big16.png")
    small = (big[::8, ::8] // 256).astype(np.uint8)
    tracemalloc.start()
    image = imageio.open_8bit(tmp_path / "big16.png")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert image.size == (2048, 2048) and image.mode == "L"
    assert peak < 2048 * 2048 + 12 * imageio.BAND_PIXELS * 8  # 4 MB out + bands; was 3 float64 copies (100 MB)
    assert np.abs(np.asarray(image)[::8, ::8].astype(int) - small).max() <= 1
