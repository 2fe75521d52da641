"""Issue 31 (second part): weights that overflow only on real images, an export's files tied by one identity,
outputs that never overwrite inputs or foreign files, scores kept when a figure cannot be written, SIGTERM
like Ctrl-C, and demo uploads that do not pile up (docs/robustness.md lists them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cxr.cli import main
from cxr.synthetic import write_synthetic_dataset

SMALL_COUNTS = {"train": 5, "val": 2, "test": 1}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("integrity") / "data", SMALL_COUNTS, size=32,
                                   bad_files=False)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def write_image(path: Path, value: int = 100, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


# Item 2: finite weights that overflow only on real (negative after normalisation) inputs ---------------------

def _negative_channel_overflows(state) -> None:
    """The issue's checkpoint: one first-layer filter of -1 and its BatchNorm scale 1e37. Non-negative inputs
    (``torch.rand``) give that channel negative values, which ReLU zeroes; a normalised radiograph is mostly
    negative (dark), so the channel reaches 1e37 and the next layers overflow."""
    state["model"]["backbone.conv1.weight"][0] = -1.0
    state["model"]["backbone.bn1.weight"][0] = 1e37


def test_weights_that_overflow_only_on_negative_inputs_are_refused_at_load(checkpoint, tmp_path):
    from cxr.inference import load_trained_model
    from cxr.models import build_model

    state = load_checkpoint(checkpoint)
    _negative_channel_overflows(state)
    damaged = save_checkpoint(state, tmp_path / "damaged.pt")
    model = build_model("resnet50", weights="none", image_size=32)
    model.load_state_dict(state["model"])
    with torch.inference_mode():  # the old probe: never negative, so the damage hid from it
        assert torch.isfinite(model.eval()(torch.rand(1, 3, 32, 32))).all()
        assert not torch.isfinite(model(-torch.rand(1, 3, 32, 32))).all()
    with pytest.raises(CheckpointError, match=r"gives non-finite outputs \(NaN or infinity, or activations beyond "
                                              r"1e\+20 in 'backbone.bn1'\) for a random image; it cannot predict"):
        load_trained_model(damaged)
    load_trained_model(checkpoint)  # the intact checkpoint passes the same probes


def test_a_non_finite_output_at_predict_time_is_an_error_naming_the_image(checkpoint, tmp_path, monkeypatch,
                                                                         capsys):
    """A model that slips past the probes (here: the load-time check switched off) and overflows on an image:
    one error line naming it, exit 1, no row with empty probabilities and no CSV."""
    from cxr import inference

    state = load_checkpoint(checkpoint)
    _negative_channel_overflows(state)
    damaged = save_checkpoint(state, tmp_path / "damaged.pt")
    monkeypatch.setattr(inference, "check_finite_outputs", lambda *args: None)
    image = write_image(tmp_path / "images" / "dark.png", 10)
    csv = tmp_path / "out.csv"
    argv = ["predict", str(image), "--checkpoint", str(damaged), "--device", "cpu", "--quiet", "--csv", str(csv)]
    assert main(argv) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "COVID19" not in out.out
    assert out.err.strip() == (f"error: {image}: the model's output is not finite (NaN or infinity) for this "
                               "image; its weights overflow on it, so none of its predictions can be trusted. "
                               "Use an earlier checkpoint.")
    assert not csv.exists()


def test_a_non_finite_output_at_evaluate_time_is_an_error_naming_the_image(checkpoint, small_root, tmp_path,
                                                                          monkeypatch, capsys):
    from cxr import inference

    state = load_checkpoint(checkpoint)
    _negative_channel_overflows(state)
    damaged = save_checkpoint(state, tmp_path / "damaged.pt")
    monkeypatch.setattr(inference, "check_finite_outputs", lambda *args: None)
    argv = ["evaluate", "resnet50_full", "--checkpoint", str(damaged), "--data-dir", str(small_root), "--out",
            str(tmp_path / "out"), "--device", "cpu", "--quiet", "--no-cache"]
    assert main(argv) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: {small_root / 'test'}") and "the model's output is not finite" in line
    assert not list((tmp_path / "out").rglob("*.json"))
