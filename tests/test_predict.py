import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxr.checkpoint import save_checkpoint
from cxr.cli import main
from cxr.config import get_experiment
from cxr.data import CLASSES, XRayDataset, build_transforms, load_splits
from cxr.engine import make_loader, predict
from cxr.models import build_model, preprocessing
from cxr.predict import collect_images, run_predict
from cxr.workflow import load_trained_model
from cxr.runtime import Runtime

CPU = Runtime.create("cpu", progress=False)

SIZE = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A ResNet50 checkpoint as ``cxr train`` writes it (random weights: the tests check the plumbing)."""
    torch.manual_seed(0)
    experiment = get_experiment("resnet50_full", epochs=1, batch_size=8, image_size=SIZE, weights="none")
    model = build_model("resnet50", weights="none", image_size=SIZE)
    path = tmp_path_factory.mktemp("run") / "best.pt"
    save_checkpoint({"model": model.state_dict(), "experiment": experiment.to_dict(), "classes": list(CLASSES),
                     "epoch": 1, "preprocessing": preprocessing("resnet50", SIZE), "seed": 42}, path)
    return str(path)


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
    assert list(written.columns) == ["file", "prediction", "probability", *CLASSES]
    np.testing.assert_allclose(written[list(CLASSES)].to_numpy(), probabilities, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == ["gray_cam.png", "rgb_cam.png",
                                                                     "sixteen_bit_cam.png"]
    with Image.open(tmp_path / "cam" / "rgb_cam.png") as overlay:
        assert overlay.size == (2 * SIZE, SIZE)


def test_predict_prepares_images_like_the_evaluation(checkpoint, synthetic_root):
    with pytest.warns(UserWarning, match="Skipped"):
        test_split = load_splits(synthetic_root).test.subset([0, 5, 9, 14])
    result = run_predict(checkpoint, test_split.paths, device="cpu", progress=False)
    model, state = load_trained_model(checkpoint)
    prep = state["preprocessing"]
    transform = build_transforms(SIZE, False, mean=prep["mean"], std=prep["std"], resize=prep["resize"])
    loader = make_loader(XRayDataset(test_split, transform), 8, False, CPU)
    logits, _ = predict(model, loader, CPU)
    expected = torch.from_numpy(logits).softmax(1).numpy()
    np.testing.assert_allclose(result.table[list(CLASSES)].to_numpy(), expected, rtol=1e-4, atol=1e-6)


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
    assert [reason for _, reason in failures] == ["folder holds no .jpg, .jpeg or .png file"]


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
