import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydicom import dcmread, uid
from pydicom.encaps import encapsulate

from cxr.evaluate.cam import CAPTION_HEIGHT, overlay_size
from cxr.models.checkpoint import save_checkpoint
from cxr.cli import main
from cxr.config import get_experiment
from cxr.data.dataset import load_splits
from cxr.data.layout import CLASSES
from cxr.train.engine import predict
from cxr.train.pipeline import build_dataset, make_loader
from cxr.data.imageio import cache_side, decode_image
from cxr.models.classifier import build_model, preprocessing
from cxr.inference.predict import collect_images, run_predict
from cxr.data.preprocessing import Preprocessing
from cxr.data.synthetic import write_dicom
from cxr.inference.trained_model import load_trained_model
from cxr.workflow import evaluate_checkpoint
from cxr.common.runtime import Runtime

CPU = Runtime.create("cpu", progress=False)

SIZE = 32


@pytest.fixture
def scans(tmp_path):
    """A folder with three good images (one in a subfolder) and four bad files."""
    folder = tmp_path / "scans"
    (folder / "more").mkdir(parents=True)
    pixels = (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "gray.png")
    Image.fromarray(pixels).convert("RGB").save(folder / "more" / "rgb.jpg", quality=90)
    Image.fromarray(pixels.astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    bad = {
        "empty.png": (b"", "empty file"),
        "notes.png": (b"just some text", "not an image"),
        "truncated.jpg": (buffer.getvalue()[: len(buffer.getvalue()) // 2], "truncated JPEG"),
        "corrupt.jpg": (b"\xff\xd8\xff\xe0 not really a jpeg", "unreadable"),
    }
    for name, (content, _) in bad.items():
        (folder / name).write_bytes(content)
    return folder, {name: reason for name, (_, reason) in bad.items()}


def test_predict_classifies_good_files_and_reports_bad_ones(checkpoint, scans, tmp_path):
    folder, bad = scans
    result = run_predict(checkpoint, [folder, tmp_path / "missing.png"], csv_path=tmp_path / "out" / "p.csv",
                         cam_dir=tmp_path / "cam", device="cpu", progress=False)
    table = result.table
    assert sorted(table["file"]) == sorted(str(p) for p in [folder / "gray.png", folder / "more" / "rgb.jpg",
                                                            folder / "sixteen_bit.png"])
    probabilities = table[list(CLASSES)].to_numpy()
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)
    assert list(table["prediction"]) == [CLASSES[k] for k in probabilities.argmax(1)]
    np.testing.assert_allclose(table["probability"], probabilities.max(1))
    reasons = {path.name: reason for path, reason in result.failures}
    assert reasons.pop("missing.png") == "no such file or folder"
    assert set(reasons) == set(bad)
    for name, reason in bad.items():
        assert reasons[name].startswith(reason)
    written = pd.read_csv(tmp_path / "out" / "p.csv")
    assert list(written.columns) == ["file", "prediction", "probability", *CLASSES, "cam"]
    np.testing.assert_allclose(written[list(CLASSES)].to_numpy(), probabilities, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == ["gray_cam.png", "rgb_cam.png",
                                                                     "sixteen_bit_cam.png"]
    assert {Path(f).name: Path(c).name for f, c in zip(written["file"], written["cam"])} == {
        "gray.png": "gray_cam.png", "rgb.jpg": "rgb_cam.png", "sixteen_bit.png": "sixteen_bit_cam.png"}
    with Image.open(tmp_path / "cam" / "rgb_cam.png") as overlay:
        assert overlay.size == overlay_size(SIZE)  # the image, its overlay, a colour bar and the caption strip
        caption = np.asarray(overlay.convert("L"))[:CAPTION_HEIGHT]
    assert caption.max() > 200 and caption.mean() < 64  # light text on black


def _radiograph(label: int, rng: np.random.Generator, width: int = 300, height: int = 240) -> np.ndarray:
    """A wide, textured image (large enough for JPEG draft mode) whose bright blob moves with the class."""
    y, x = np.mgrid[0:height, 0:width] / height
    blob = np.exp(-((y - 0.3 - 0.4 * (label % 2)) ** 2 + (x - 0.4 - 0.3 * (label // 2)) ** 2) / 0.03)
    return np.clip(60 + 150 * blob + rng.normal(0, 25, (height, width)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory):
    """A checkpoint whose head is scaled up (probabilities move with tiny input changes) and a Kaggle-layout
    folder of wide JPEGs and 16-bit PNGs."""
    root = tmp_path_factory.mktemp("wide") / "data"
    rng = np.random.default_rng(1)
    for split, count in (("train", 10), ("test", 3)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                pixels = _radiograph(label, rng)
                if index == 2:
                    Image.fromarray(pixels.astype(np.uint16) * 200 + 1000).save(root / split / name / f"{index}.png")
                else:
                    Image.fromarray(pixels).save(root / split / name / f"{index}.jpg", quality=90)
    torch.manual_seed(0)
    experiment = get_experiment("resnet50_full", epochs=1, batch_size=8, image_size=SIZE, weights="none")
    model = build_model("resnet50", weights="none", image_size=SIZE)
    prep = preprocessing("resnet50", SIZE)
    square = decode_image(root / "train" / CLASSES[0] / "0.jpg", cache_side(SIZE, prep["resize"]))
    with torch.no_grad():  # logits = 30 x (the random model's logits - those of one training image)
        offset = model.eval()(Preprocessing.from_dict(prep).transform()(torch.from_numpy(square)[None, None]))[0]
        model.head.weight.mul_(30)
        model.head.bias.mul_(30).sub_(30 * offset)
    path = root.parent / "best.pt"
    save_checkpoint({"model": model.state_dict(), "experiment": experiment.to_dict(), "classes": list(CLASSES),
                     "epoch": 1, "preprocessing": prep, "seed": 42}, path)
    return path, root


def test_predict_evaluate_and_validation_give_the_same_probabilities(sensitive, tmp_path):
    checkpoint, root = sensitive
    test_split = load_splits(root).test
    folder = evaluate_checkpoint(checkpoint, data_dir=root, out=tmp_path / "out", runtime=CPU)["folder"]
    evaluated = torch.from_numpy(np.load(Path(folder) / "test_logits.npz")["logits"]).softmax(1)
    predicted = run_predict(checkpoint, test_split.paths, device="cpu", progress=False).table
    model, state = load_trained_model(checkpoint)
    assert predicted["probability"].min() < 0.99  # the probabilities are not saturated: the comparison means something
    for cache in (True, False):  # the validation pass of `cxr train`, with and without the decoded-image cache
        experiment = get_experiment("resnet50_full", image_size=SIZE)
        runtime = Runtime.create("cpu", cache=cache, cache_dir=tmp_path / "cache", progress=False)
        dataset, _, _ = build_dataset(test_split, experiment, state["preprocessing"], runtime, False)
        logits, _ = predict(model, make_loader(dataset, 8, False, runtime), runtime)
        np.testing.assert_allclose(torch.from_numpy(logits).softmax(1).numpy(), evaluated.numpy(), atol=1e-3)
    assert list(predicted["file"]) == [str(p) for p in test_split.paths]
    np.testing.assert_allclose(predicted[list(CLASSES)].to_numpy(), evaluated.numpy(), atol=1e-3)


def test_tta_views_stay_inside_the_evaluated_square(checkpoint, tmp_path):
    """A tall image whose top and bottom (neck, abdomen) are white: TTA must see only its centre square, so
    it gives what the centre square alone gives."""
    side = cache_side(SIZE, preprocessing("resnet50", SIZE)["resize"])
    middle = _radiograph(1, np.random.default_rng(2), side, side)
    tall = np.concatenate([np.full((side, side), 255, np.uint8), middle, np.full((side, side), 255, np.uint8)])
    Image.fromarray(tall).save(tmp_path / "tall.png")
    Image.fromarray(middle).save(tmp_path / "square.png")
    table = run_predict(checkpoint, [tmp_path / "tall.png", tmp_path / "square.png"], device="cpu", tta=True,
                        progress=False).table
    np.testing.assert_allclose(table[list(CLASSES)].to_numpy()[0], table[list(CLASSES)].to_numpy()[1], atol=1e-6)


def test_predict_reads_dicom_like_the_same_png(checkpoint, tmp_path):
    pixels = _radiograph(2, np.random.default_rng(3), 60, 48)
    pixels[0, 0], pixels[-1, -1] = 0, 255  # the full 8-bit range, so 12-bit scaling lands on the same levels
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    write_dicom(tmp_path / "scan_mono1.dcm", (255 - pixels.astype(np.uint16)) * 16, "MONOCHROME1", bits_stored=12)
    write_dicom(tmp_path / "scan_window.dcm", pixels.astype(np.uint16) * 16 + 100, bits_stored=12,
                window=(100 + 255 * 16 / 2, 255 * 16 + 1))
    write_dicom(tmp_path / "unsupported.dcm", pixels)
    ds = dcmread(tmp_path / "unsupported.dcm")
    ds.file_meta.TransferSyntaxUID = uid.JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 JPEG-LS bytes"])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "unsupported.dcm")
    result = run_predict(checkpoint, [tmp_path], device="cpu", cam_dir=tmp_path / "cam", progress=False)
    table = result.table.set_index(result.table["file"].map(lambda f: Path(f).name))
    probabilities = table[list(CLASSES)]
    np.testing.assert_allclose(probabilities.loc["scan_mono1.dcm"], probabilities.loc["scan.png"], atol=1e-6)
    np.testing.assert_allclose(probabilities.loc["scan_window.dcm"], probabilities.loc["scan.png"], atol=2e-3)
    [(path, reason)] = result.failures
    assert path.name == "unsupported.dcm" and "JPEG-LS" in reason and "no decoder" in reason
    assert len(result.cam_files) == 3


def test_predict_with_tta_averages_views(checkpoint, scans):
    folder, _ = scans
    plain = run_predict(checkpoint, [folder / "gray.png"], device="cpu", progress=False).table
    averaged = run_predict(checkpoint, [folder / "gray.png"], device="cpu", tta=True, progress=False).table
    assert averaged[list(CLASSES)].to_numpy().sum() == pytest.approx(1, abs=1e-5)
    assert not np.allclose(plain[list(CLASSES)].to_numpy(), averaged[list(CLASSES)].to_numpy())


def test_collect_images_expands_folders_and_keeps_named_files(scans, tmp_path):
    folder, _ = scans
    (tmp_path / "nothing").mkdir()
    found, failures = collect_images([folder / "notes.png", folder, tmp_path / "nothing"])
    assert found[0] == folder / "notes.png"
    assert folder / "more" / "rgb.jpg" in found
    assert [reason for _, reason in failures] == ["folder holds no .jpg, .jpeg, .png or .dcm file"]


def test_cli_predict_prints_a_table_and_skips_bad_files(checkpoint, scans, tmp_path, capsys):
    folder, _ = scans
    code = main(["predict", "--checkpoint", checkpoint, str(folder / "gray.png"), str(folder / "notes.png"),
                 "--csv", str(tmp_path / "p.csv"), "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0
    assert "prediction" in captured.out and "gray.png" in captured.out and "COVID19" in captured.out
    assert "1 image(s) classified, 1 skipped" in captured.out
    assert f"skipped {folder / 'notes.png'}: not an image" in captured.err
    assert len(pd.read_csv(tmp_path / "p.csv")) == 1


def test_cli_predict_fails_cleanly_without_any_readable_image(checkpoint, scans, tmp_path, capsys):
    folder, _ = scans
    assert main(["predict", "--checkpoint", checkpoint, str(folder / "empty.png"), "--quiet"]) == 1
    assert "error: none of the given files" in capsys.readouterr().err
    (tmp_path / "fake.pt").write_bytes(b"not a checkpoint")
    assert main(["predict", "--checkpoint", str(tmp_path / "fake.pt"), str(folder), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
