"""DICOM in: modality LUT and window applied, MONOCHROME1 inverted, one rule from 12/16 bits to 8, the right
way up, and read by datasets, the cache and the audit like any other image."""

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread, uid
from pydicom.encaps import encapsulate

from cxr.data import cache
from cxr.audit.data_audit import audit_dataset
from cxr.data.dataset import check_image, load_splits
from cxr.data.layout import CLASSES
from cxr.data.imageio import decode_image
from cxr.data.synthetic import write_dicom, write_synthetic_dataset

SIDE = 48


def _radiograph(top: int = 4095) -> np.ndarray:
    """64 x 48 values in [0, top]: dark on the left, bright on the right, and a bright band along the top."""
    values = np.tile(np.linspace(0, top, 64), (48, 1))
    values[:8] = top
    return values.round().astype(np.uint16 if top > 255 else np.uint8)


def test_8_bit_monochrome2_reads_as_stored(tmp_path):
    pixels = _radiograph(255)
    Image.fromarray(pixels).save(tmp_path / "same.png")
    write_dicom(tmp_path / "image.dcm", pixels)
    square = decode_image(tmp_path / "image.dcm", SIDE)
    assert np.array_equal(square, decode_image(tmp_path / "same.png", SIDE))
    assert square[:8].min() == 255 and square[8:, :8].mean() < square[8:, -8:].mean()  # right way up, not mirrored


@pytest.mark.parametrize("rle", [False, True])
def test_12_bit_monochrome1_is_inverted_and_scaled_like_a_16_bit_png(tmp_path, rle):
    pixels = _radiograph(4095)
    Image.fromarray(pixels * 16).save(tmp_path / "same.png")  # 16-bit PNG: its minimum to maximum, like DICOM
    write_dicom(tmp_path / "mono2.dcm", pixels, bits_stored=12)
    write_dicom(tmp_path / "mono1.dcm", 4095 - pixels, "MONOCHROME1", bits_stored=12, rle=rle)  # white is zero
    expected = decode_image(tmp_path / "same.png", SIDE)
    assert np.array_equal(decode_image(tmp_path / "mono2.dcm", SIDE), expected)
    assert np.array_equal(decode_image(tmp_path / "mono1.dcm", SIDE), expected)
    assert expected[:8].min() == 255 and expected[8:, 0].max() < 40  # bright band on top, dark left edge


def test_a_window_sets_the_contrast_in_modality_units(tmp_path):
    pixels = _radiograph(4095)
    write_dicom(tmp_path / "window.dcm", pixels, bits_stored=12, window=(2048, 1024))
    write_dicom(tmp_path / "rescaled.dcm", pixels, bits_stored=12, window=(0, 1024), rescale=(-2048, 1))
    write_dicom(tmp_path / "mono1.dcm", 4095 - pixels, "MONOCHROME1", bits_stored=12, window=(2047, 1024))
    square = decode_image(tmp_path / "window.dcm", SIDE)
    stored = pixels[:, 8:56].astype(float)  # the centre square of the 64 x 48 image
    assert (square[stored < 1530] == 0).all() and (square[stored > 2565] == 255).all()
    inside = (stored > 1600) & (stored < 2500)
    np.testing.assert_allclose(square[inside], (stored[inside] - 1535.5) / 1023 * 255, atol=1)  # linear in between
    assert np.array_equal(decode_image(tmp_path / "rescaled.dcm", SIDE), square)
    assert np.abs(decode_image(tmp_path / "mono1.dcm", SIDE).astype(int) - square).max() <= 1


def test_unusable_dicom_files_get_a_clear_reason(tmp_path):
    write_dicom(tmp_path / "no_pixels.dcm", _radiograph(255))
    ds = dcmread(tmp_path / "no_pixels.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "no_pixels.dcm")
    write_dicom(tmp_path / "jpeg_ls.dcm", _radiograph(4095), bits_stored=12)
    ds = dcmread(tmp_path / "jpeg_ls.dcm")
    ds.file_meta.TransferSyntaxUID = uid.JPEGLSLossless  # no JPEG-LS decoder is installed
    ds.PixelData = encapsulate([b"\xff\xd8 JPEG-LS bytes"])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "jpeg_ls.dcm")
    (tmp_path / "text.dcm").write_text("a DICOM name, no DICOM inside")
    assert check_image(tmp_path / "no_pixels.dcm") == "DICOM file without an image (no pixel data)"
    assert check_image(tmp_path / "jpeg_ls.dcm").startswith("DICOM pixel data in JPEG-LS Lossless Image Compression: "
                                                            "no decoder for it is installed")
    assert check_image(tmp_path / "text.dcm") == "not a DICOM file"


def test_datasets_the_cache_and_the_audit_read_dicom(tmp_path):
    root = write_synthetic_dataset(tmp_path / "data", {"train": 2, "test": 1}, bad_files=False)
    folder = root / "train" / CLASSES[0]
    write_dicom(folder / "scan.dcm", 4095 - _radiograph(4095), "MONOCHROME1", bits_stored=12)
    write_dicom(folder / "scan_upper_case.DCM", _radiograph(255))
    (folder / "broken.dcm").write_text("not DICOM")
    with pytest.warns(UserWarning, match="broken.dcm"):
        splits = load_splits(root, val_source="carve", val_fraction=0.5)
    used = splits.train.paths + splits.val.paths
    assert folder / "scan.dcm" in used and folder / "scan_upper_case.DCM" in used
    cached = cache.cache_split(splits.train, SIDE, tmp_path / "cache", workers=0, progress=False)
    assert not cached.split.skipped
    report = audit_dataset(root, progress=False)
    assert report["splits"]["train"]["modes"]["DICOM MONOCHROME1 12-bit"] == 1
    assert [s["reason"] for s in report["splits"]["train"]["skipped"]] == ["not a DICOM file"]
