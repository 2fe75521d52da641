"""docs/export.md's standalone recipe (numpy, Pillow, onnxruntime) gives ``cxr predict``'s input and probabilities:
run as written, on JPEGs that draft mode shrinks, an EXIF-rotated one and a transparent PNG, at 64 and 224 px."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.models.checkpoint import save_checkpoint
from cxr.cli import main
from cxr.config import get_experiment
from cxr.data.layout import CLASSES
from cxr.data.imageio import decode_image
from cxr.models.classifier import build_model, estimate_batchnorm_statistics, preprocessing
from cxr.inference.predict import run_predict
from cxr.data.preprocessing import Preprocessing

ROOT = Path(__file__).resolve().parents[1]


def recipe_source() -> str:
    text = (ROOT / "docs" / "export.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    return block


def write_scans(folder: Path) -> list[Path]:
    """Chest-like gradients with noise: large JPEGs (decoded at 1/2 to 1/8 scale), a rotated one, an RGBA PNG."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:900, 0:700]
    base = (120 + 80 * np.sin(x / 60) * np.cos(y / 90) + rng.normal(0, 25, (900, 700))).clip(0, 255).astype(np.uint8)
    paths = [folder / "normal.jpg", folder / "wide.jpg", folder / "rotated.jpg", folder / "overlay.png"]
    Image.fromarray(base).save(paths[0], quality=92)
    Image.fromarray(np.stack([base.T, base.T // 2, 255 - base.T], -1)).save(paths[1], quality=85)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated 90 degrees
    Image.fromarray(base[:500, :300]).save(paths[2], quality=90, exif=exif)
    rgba = np.dstack([base[:200, :260]] * 3 + [np.full((200, 260), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(paths[3])
    return paths


@pytest.mark.parametrize("size", [64, 224])
def test_the_documented_recipe_gives_the_probabilities_of_cxr_predict(size, tmp_path, monkeypatch):
    torch.manual_seed(0)
    experiment = get_experiment("resnet50_full", epochs=1, batch_size=8, image_size=size, weights="none")
    model = build_model("resnet50", weights="none", image_size=size)
    estimate_batchnorm_statistics(model.backbone, [torch.randn(4, 3, size, size)], torch.device("cpu"))
    with torch.no_grad():  # well-conditioned random weights, as in tests/test_export.py: probabilities not saturated
        for name, module in model.backbone.named_modules():
            if name.endswith(".bn3"):
                module.weight.mul_(0.5)
    prep = preprocessing("resnet50", size)
    checkpoint = save_checkpoint({"model": model.state_dict(), "experiment": experiment.to_dict(),
                                  "classes": list(CLASSES), "epoch": 1, "preprocessing": prep, "seed": 42},
                                 tmp_path / "run" / "checkpoints" / "best.pt")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export" / "vit_b16_head")]) == 0
    scans = write_scans(tmp_path / "scans")
    monkeypatch.chdir(tmp_path)  # the recipe's own paths: export/vit_b16_head/, scans/normal.jpg
    names: dict = {}
    exec(compile(recipe_source(), "docs/export.md", "exec"), names)
    assert names["side"] == Preprocessing.from_dict(prep).square_side != prep["resize"]  # the second resize runs
    transform = Preprocessing.from_dict(prep).transform()
    for path in scans:  # the recipe's input is the tensor cxr feeds the model
        expected = transform(torch.from_numpy(decode_image(path, names["side"]))[None, None]).numpy()
        np.testing.assert_allclose(names["model_input"](path), expected, rtol=0, atol=1e-4)
    predicted = run_predict(str(tmp_path / "export" / "vit_b16_head"), [os.fspath(p) for p in scans], device="cpu",
                            progress=False).table
    recipe = np.stack([names["session"].run(["probabilities"], {"image": names["model_input"](p)})[0][0]
                       for p in scans])
    spread = np.ptp(predicted[list(CLASSES)].to_numpy(), axis=0).max()
    assert 0.01 < spread and predicted["probability"].max() < 0.99  # neither flat nor saturated: the check means something
    np.testing.assert_allclose(recipe, predicted[list(CLASSES)].to_numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(names["probabilities"], recipe[0], rtol=0, atol=1e-6)
