"""Hostile files (issue 31): every decode refused or bounded by one rule in cxr.data.imageio, per file, from the
header where it can be, with peak memory bounded whatever the file promises."""

import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid

from cxr.data import imageio
from cxr.data.dataset import check_image
from cxr.data.imageio import ImageReadError, decode_image, jpeg_scans
from cxr.inference.predict import read_image
from cxr.data.synthetic import write_dicom

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
    from cxr.inference.predict import run_predict

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


# 13 and 15: .pt files: a zip bomb, a truncated file, absurd image sizes, a pickle of other objects -----

class CreatesFile:
    """Unpickling this runs ``open(target, "w")``: what a malicious weights file would do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return open, (str(self.target), "w")


def _refused_without_loading(monkeypatch):
    import torch

    def never(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", never)


def _zip_bomb(path: Path, inflated: int = 8 * 2**20) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * inflated)
    return path


def test_a_zip_bomb_pt_is_refused_from_its_zip_directory(tmp_path, monkeypatch):
    from cxr.models.checkpoint import CheckpointError, load_checkpoint
    from cxr.models.classifier import WeightsError, build_model

    bomb = _zip_bomb(tmp_path / "bomb.pt")
    assert bomb.stat().st_size < 100_000
    _refused_without_loading(monkeypatch)
    with pytest.raises(CheckpointError, match=r"bomb.pt' holds records that would inflate to 8 MB from a 0.0 MB file"):
        load_checkpoint(bomb)
    with pytest.raises(WeightsError, match="would inflate to 8 MB"):
        build_model("resnet50", 4, bomb)


def test_a_truncated_pt_says_truncated(checkpoint, tmp_path):
    import torch

    from cxr.models.checkpoint import CheckpointError, load_checkpoint
    from cxr.models.classifier import WeightsError, build_model

    data = Path(checkpoint).read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.pt' is truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(WeightsError, match=r"cut.pt': it is truncated"):
        build_model("resnet50", 4, tmp_path / "cut.pt")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "whole.pt")
    (tmp_path / "tail_cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:-30])  # the end record cut
    with pytest.raises(WeightsError, match=r"tail_cut.pt': it is truncated"):
        build_model("resnet50", 4, tmp_path / "tail_cut.pt")


@pytest.mark.parametrize("field, value, message", [
    ("experiment.image_size", 100_000, "has experiment.image_size 100000, outside 32-1024 px"),
    ("preprocessing.image_size", 4096, "has preprocessing.image_size 4096, outside 32-1024 px"),
    ("preprocessing.resize", 200_000, "has preprocessing.resize 200000: it must be a whole number of pixels"),
])
def test_absurd_image_sizes_in_a_checkpoint_are_refused_at_load(checkpoint, tmp_path, capsys, field, value, message):
    import torch

    from cxr.cli import main

    state = torch.load(checkpoint, weights_only=True)
    part, key = field.split(".")
    state[part][key] = value
    torch.save(state, tmp_path / "edited.pt")
    Image.fromarray(_gradient(top=255).astype(np.uint8)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(tmp_path / "edited.pt"), "--device", "cpu",
                 "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "edited.pt' " + message in err


def test_a_weights_file_holding_other_objects_is_refused_in_plain_words(tmp_path):
    import torch

    from cxr.models.classifier import WeightsError, build_model

    torch.save({"conv1.weight": CreatesFile(tmp_path / "pwned")}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError) as caught:
        build_model("resnet50", 4, tmp_path / "evil.pth")
    message = str(caught.value)
    assert message.startswith(f"Could not read weights file {str(tmp_path / 'evil.pth')!r}: it is not a plain state "
                              "dict: it holds "
                              "objects other than tensors and plain data")
    assert "refused for safety" in message and "weights_only" not in message and "\n" not in message
    assert not (tmp_path / "pwned").exists()


# 15 (a file name that is not UTF-8) and 17 (an image replaced in place) ---------------------------------

def _replace_in_place(path: Path, pixels: np.ndarray) -> None:
    """New pixels, the same file size (uncompressed PNG) and the same modification time as before."""
    import os

    before = path.stat()
    Image.fromarray(pixels).save(path, compress_level=0)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_the_cache_serves_new_pixels_for_an_image_replaced_in_place(tmp_path):
    from cxr.data.cache import cache_split
    from cxr.data.dataset import Split

    path = tmp_path / "scan.png"
    Image.fromarray(_gradient(top=255).astype(np.uint8)).save(path, compress_level=0)
    first = cache_split(Split([path], [0]), SIDE, tmp_path / "cache", workers=0, progress=False)
    _replace_in_place(path, 255 - _gradient(top=255).astype(np.uint8))
    second = cache_split(Split([path], [0]), SIDE, tmp_path / "cache", workers=0, progress=False)
    assert second.decoded == 1 and np.array_equal(second.images[0], 255 - first.images[0])


def test_resume_refuses_an_image_replaced_in_place_with_the_same_size_and_time(tmp_path):
    from cxr.models.checkpoint import CheckpointError
    from cxr.config import get_experiment
    from cxr.data.dataset import load_splits
    from cxr.train.engine import fit
    from cxr.common.runtime import Runtime
    from cxr.data.synthetic import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "data", {"train": 5, "val": 2, "test": 1}, size=32, bad_files=False)
    target = sorted((root / "train" / "NORMAL").glob("*.png"))[0]
    Image.open(target).convert("L").save(target, compress_level=0)
    experiment = get_experiment("resnet50_full", epochs=1, batch_size=8, image_size=32, weights="none")
    cpu = Runtime.create("cpu", progress=False)
    fit(experiment, load_splits(root, val_source="given"), tmp_path / "run", cpu, seed=3)
    _replace_in_place(target, 255 - np.asarray(Image.open(target)))
    with pytest.raises(CheckpointError, match=r"the train image files differ \(names, sizes or contents"):
        fit(experiment, load_splits(root, val_source="given"), tmp_path / "run", cpu, seed=3, resume=True)


def test_a_file_name_that_is_not_utf8_is_read_like_any_other(checkpoint, tmp_path):
    import os

    from cxr.data.cache import cache_split
    from cxr.data.dataset import load_splits
    from cxr.train.engine import data_signature
    from cxr.data.synthetic import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "data", {"train": 2, "test": 1}, size=32, bad_files=False)
    folder = os.fsencode(root / "test" / "NORMAL")
    Image.fromarray(_gradient(top=255).astype(np.uint8)).save(os.path.join(folder, b"scan-\xff\xfe.png").decode(
        "utf-8", "surrogateescape"))
    splits = load_splits(root, val_source="carve")
    odd = [p for p in splits.test.paths if "\udcff" in str(p)]
    assert len(odd) == 1
    assert data_signature(splits)["files"]["test"]  # was UnicodeEncodeError for the whole dataset
    cached = cache_split(splits.test, SIDE, tmp_path / "cache", workers=0, progress=False)
    assert odd[0] in cached.split.paths and not cached.split.skipped
    import subprocess
    import sys

    csv = tmp_path / "predictions.csv"  # stdout strict, as under an en_US.UTF-8 locale: the name used to crash it
    done = subprocess.run([sys.executable, "-m", "cxr", "predict", os.fsencode(odd[0]), "--checkpoint", checkpoint,
                           "--device", "cpu", "--quiet", "--csv", csv], capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8:strict", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert b"scan-\xff\xfe.png" in done.stdout and b"scan-\xff\xfe.png" in csv.read_bytes()


# 16: folder names that only look like a class ----------------------------------------------------------

def test_ignored_folders_are_shown_with_their_invisible_characters(tmp_path):
    from cxr.audit.data_audit import audit_dataset
    from cxr.data.layout import visible_name
    from cxr.data.synthetic import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "data", {"train": 2, "test": 1}, size=32, bad_files=False)
    for name in ("Normal ", "N\u041eRMAL", "LUNG_OPACITY"):  # a trailing space; a Cyrillic O
        (root / "train" / name).mkdir()
        Image.fromarray(_gradient(top=255).astype(np.uint8)).save(root / "train" / name / "x.png")
    assert visible_name("LUNG_OPACITY") == "LUNG_OPACITY"
    assert visible_name("Normal ") == "'Normal ' (looks like NORMAL, but is another name)"
    assert visible_name("N\u041eRMAL") == "'N\\u041eRMAL' (looks like NORMAL, but is another name)"
    report = audit_dataset(root, progress=False, cache_dir=tmp_path / "cache")
    message = next(m for m in report["warnings"] if m.startswith("Folders that are not classes"))
    assert "'train/Normal ' (looks like NORMAL, but" in message and message.isascii()
    assert "'train/N\\u041eRMAL' (looks like NORMAL, but" in message and "train/LUNG_OPACITY," in message


# 12, the demo page: one slow upload does not hold the others -------------------------------------------

def test_a_slow_upload_does_not_block_the_next_one_on_the_demo_page(checkpoint, tmp_path, monkeypatch):
    import socket
    import threading
    import time

    from gradio_client import Client, handle_file

    from cxr.inference import serve as serve_module

    decode = imageio.open_8bit

    def slow_decode(path, draft_side=None):  # stands for a file that takes long to decode
        if Path(path).name.startswith("slow"):
            time.sleep(3)
        return decode(path, draft_side)

    monkeypatch.setattr(imageio, "open_8bit", slow_decode)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    for name in ("slow.png", "normal.png"):
        Image.fromarray(_gradient(top=255).astype(np.uint8)).save(tmp_path / name)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo = serve_module.serve(checkpoint, port=port, device="cpu", block=False)
    finished = {}

    def classify(name: str) -> None:
        client.predict(handle_file(str(tmp_path / name)), api_name="/classify")
        finished[name] = time.monotonic()

    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        slow = threading.Thread(target=classify, args=("slow.png",))
        slow.start()
        time.sleep(1)
        classify("normal.png")
        slow.join()
    finally:
        demo.close()
    assert finished["normal.png"] < finished["slow.png"]  # with one upload at a time it waited for the slow one
