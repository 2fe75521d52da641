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

from cxr.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cxr.cli import main
from cxr.data.synthetic import write_synthetic_dataset

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
    from cxr.inference.trained_model import load_trained_model
    from cxr.models.classifier import build_model

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
    from cxr.inference import trained_model as inference

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
    from cxr.inference import trained_model as inference

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


# Items 3 and 4: an export's three files tied by one identity -------------------------------------------------

@pytest.fixture(scope="module")
def exports(checkpoint, tmp_path_factory):
    """Two exports of the same architecture and classes with other weights: A and B."""
    from cxr.inference.export import export_model

    root = tmp_path_factory.mktemp("exports")
    state = load_checkpoint(checkpoint)
    state["model"]["head.bias"] += torch.tensor([3.0, 0.0, 0.0, 0.0])
    other = save_checkpoint(state, root / "other.pt")
    export_model(checkpoint, root / "a")
    export_model(other, root / "b")
    return root / "a", root / "b"


def mixed_export(folder: Path, parts: dict[str, Path]) -> Path:
    """A copy of the export A with the files named in ``parts`` taken from elsewhere."""
    import shutil

    folder.mkdir()
    for name in ("model.onnx", "model.safetensors", "model.json"):
        shutil.copy(parts.get(name, parts["base"] / name), folder / name)
    return folder


def test_an_export_with_another_exports_weights_or_onnx_is_refused(exports, tmp_path, capsys):
    from cxr.inference.export import ExportError, load_export

    a, b = exports
    load_export(mixed_export(tmp_path / "intact", {"base": a}))  # a plain copy still loads
    weights = mixed_export(tmp_path / "weights", {"base": a, "model.safetensors": b / "model.safetensors"})
    with pytest.raises(ExportError, match=r"mixes files of different exports: model.safetensors holds other "
                                          r"weights than this export was made with"):
        load_export(weights)
    image = write_image(tmp_path / "image.png")
    assert main(["predict", str(image), "--checkpoint", str(weights), "--device", "cpu", "--quiet"]) == 1
    assert error_line(capsys).startswith(f"error: {str(weights)!r} mixes files of different exports")
    onnx_file = mixed_export(tmp_path / "onnx", {"base": a, "model.onnx": b / "model.onnx"})
    with pytest.raises(ExportError, match=r"model.onnx belongs to another export \(the identity in its metadata"):
        load_export(onnx_file)


def _rewrite_onnx_metadata(path: Path, change) -> None:
    import onnx

    graph = onnx.load(str(path))
    metadata = {prop.key: prop.value for prop in graph.metadata_props}
    change(metadata)
    del graph.metadata_props[:]
    onnx.helper.set_model_props(graph, metadata)
    onnx.save(graph, str(path))


def test_classes_reordered_in_model_json_and_onnx_alike_are_refused(exports, tmp_path):
    """The earlier check compared model.json's classes with the ONNX metadata: edited alike, they agreed."""
    from cxr.inference.export import ExportError, load_export

    folder = mixed_export(tmp_path / "reordered", {"base": exports[0]})
    description = json.loads((folder / "model.json").read_text())
    swapped = ["NORMAL", "COVID19", "PNEUMONIA", "TUBERCULOSIS"]
    description["classes"] = swapped
    (folder / "model.json").write_text(json.dumps(description))
    _rewrite_onnx_metadata(folder / "model.onnx", lambda metadata: metadata.update(classes=json.dumps(swapped)))
    with pytest.raises(ExportError, match=r"the class list \['NORMAL', 'COVID19', 'PNEUMONIA', 'TUBERCULOSIS'\] is "
                                          r"not the one this export was made with"):
        load_export(folder)


def test_an_onnx_file_relabelled_with_this_exports_identity_is_refused_by_its_weights(exports, tmp_path):
    from cxr.inference.export import ExportError, load_export

    a, b = exports
    folder = mixed_export(tmp_path / "relabelled", {"base": a, "model.onnx": b / "model.onnx"})
    identity = json.loads((a / "model.json").read_text())["identity"]["sha256"]
    _rewrite_onnx_metadata(folder / "model.onnx", lambda metadata: metadata.update(identity=identity))
    with pytest.raises(ExportError, match=r"model.onnx holds other weights than this export wrote"):
        load_export(folder)


def test_an_export_without_an_identity_is_refused(exports, tmp_path):
    from cxr.inference.export import ExportError, load_export

    folder = mixed_export(tmp_path / "old", {"base": exports[0]})
    description = json.loads((folder / "model.json").read_text())
    del description["identity"]
    (folder / "model.json").write_text(json.dumps(description))
    with pytest.raises(ExportError, match=r"has no valid 'identity' .*; re-export the checkpoint with cxr export"):
        load_export(folder)


# Item 8: export --force replaces only what an export wrote ---------------------------------------------------

@pytest.mark.parametrize("foreign, named", [
    ({"notes.txt": "my notes"}, "notes.txt"),
    ({"data/a.csv": "a,b\n1,2\n"}, "data/"),
    ({"notes.txt": "my notes", "data/a.csv": "a,b\n"}, "data/, notes.txt"),
])
def test_export_force_keeps_files_it_did_not_write(exports, checkpoint, tmp_path, capsys, foreign, named):
    import shutil

    out = tmp_path / "export"
    shutil.copytree(exports[0], out)
    for name, text in foreign.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["export", "--checkpoint", checkpoint, "--out", str(out), "--force"]) == 1
    assert error_line(capsys) == (f"error: {str(out)!r} holds files cxr export did not write ({named}); not "
                                  "replacing it, even with --force: move them elsewhere or choose another --out.")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_export_force_refuses_a_foreign_model_json_and_replaces_its_own_export(exports, checkpoint, tmp_path,
                                                                               capsys):
    import shutil

    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.json").write_text('{"name": "my own model"}')
    assert main(["export", "--checkpoint", checkpoint, "--out", str(out), "--force"]) == 1
    assert "is not an export folder (no model.json written by cxr export)" in error_line(capsys)
    assert (out / "model.json").read_text() == '{"name": "my own model"}'
    again = tmp_path / "again"
    shutil.copytree(exports[1], again)
    assert main(["export", "--checkpoint", checkpoint, "--out", str(again), "--force"]) == 0
    written = json.loads((again / "model.json").read_text())
    assert written["identity"] == json.loads((exports[0] / "model.json").read_text())["identity"]
    assert sorted(p.name for p in again.iterdir()) == written["written"]


# Items 6 and 7: predict --cam and --csv never overwrite inputs, skip their own overlays, survive long names ----

def predict_argv(checkpoint: str, *paths: Path, **flags: Path) -> list[str]:
    extra = [item for flag, value in flags.items() for item in (f"--{flag}", str(value))]
    return ["predict", *map(str, paths), "--checkpoint", checkpoint, "--device", "cpu", "--quiet", *extra]


def test_cam_into_the_input_folder_keeps_inputs_and_skips_its_overlays_next_time(checkpoint, tmp_path, capsys):
    folder = tmp_path / "patients"
    chest = write_image(folder / "chest.png", 90)
    named_like_overlay = write_image(folder / "chest_cam.png", 160)  # a patient's file, not an overlay
    original = named_like_overlay.read_bytes()
    assert main(predict_argv(checkpoint, folder, cam=folder)) == 0
    out = capsys.readouterr().out
    assert named_like_overlay.read_bytes() == original
    written = sorted(p.name for p in folder.iterdir() if p not in (chest, named_like_overlay))
    assert written == ["chest_2_cam.png", "chest_cam_cam.png"]
    assert "2 image(s) classified;" in out
    csv = tmp_path / "second.csv"
    assert main(predict_argv(checkpoint, folder, cam=folder, csv=csv)) == 0  # the second run: the same two patients
    captured = capsys.readouterr()
    assert "2 image(s) classified, 1 skipped;" in captured.out
    assert list(__import__("pandas").read_csv(csv)["file"]) == [str(chest), str(named_like_overlay)]
    assert captured.err.strip() == (f"skipped {folder}: 2 Grad-CAM overlay(s) written by cxr predict --cam left out "
                                    "(not radiographs)")
    assert sorted(p.name for p in folder.iterdir()) == ["chest.png", "chest_2_cam.png", "chest_cam.png",
                                                       "chest_cam_cam.png"]  # rewritten in place, no new ones
    assert named_like_overlay.read_bytes() == original


def test_an_overlay_never_replaces_a_foreign_file_in_the_cam_folder(checkpoint, tmp_path, capsys):
    chest = write_image(tmp_path / "in" / "chest.png")
    foreign = write_image(tmp_path / "cams" / "chest_cam.png", 200)  # someone else's file, no marker
    original = foreign.read_bytes()
    assert main(predict_argv(checkpoint, chest, cam=tmp_path / "cams")) == 0
    assert foreign.read_bytes() == original and (tmp_path / "cams" / "chest_2_cam.png").is_file()
    capsys.readouterr()


def test_csv_naming_an_input_is_refused(checkpoint, tmp_path, capsys):
    from cxr.inference.predict import run_predict
    from cxr.common.inputs import InputError

    chest = write_image(tmp_path / "chest.png")
    original = chest.read_bytes()
    assert main(predict_argv(checkpoint, chest, csv=chest)) == 1
    assert error_line(capsys) == (f"error: --csv {str(chest)!r} is one of the input files; writing there would "
                                  "overwrite it. Give another file name.")
    with pytest.raises(InputError, match="is one of the input files"):  # also through a folder, from Python
        run_predict(checkpoint, [tmp_path], csv_path=chest, device="cpu", progress=False)
    assert chest.read_bytes() == original


def test_a_250_character_file_name_costs_no_row_with_cam(checkpoint, tmp_path, capsys, monkeypatch):
    long_a = write_image(tmp_path / "in" / ("a" * 250 + ".png"), 80)  # 254 characters, legal; its overlay not
    long_b = write_image(tmp_path / "in" / ("a" * 249 + "b.png"), 120)  # same beginning: another overlay
    short = write_image(tmp_path / "in" / "short.png", 140)
    csv = tmp_path / "out.csv"
    assert main(predict_argv(checkpoint, tmp_path / "in", cam=tmp_path / "cams", csv=csv)) == 0
    out = capsys.readouterr().out
    assert "3 image(s) classified;" in out
    table = __import__("pandas").read_csv(csv)
    assert sorted(table["file"]) == sorted(map(str, (long_a, long_b, short)))
    cams = sorted((tmp_path / "cams").iterdir())
    assert len(cams) == 3 and all(len(p.name.encode()) <= 255 for p in cams)
    assert all(Path(c).is_file() for c in table["cam"])

    from cxr.evaluate import cam

    real_save = cam.save_overlay

    def no_space_for_one(display, heat_map, path, *args):  # any write error costs that overlay only
        if path.name.startswith("short"):
            raise OSError(28, "No space left on device")
        return real_save(display, heat_map, path, *args)

    monkeypatch.setattr(cam, "save_overlay", no_space_for_one)
    assert main(predict_argv(checkpoint, tmp_path / "in", cam=tmp_path / "cams2", csv=csv)) == 0
    captured = capsys.readouterr()
    assert "3 image(s) classified, 1 skipped;" in captured.out
    assert captured.err.strip() == (f"skipped {short}: classified, but its Grad-CAM overlay 'short_cam.png' could "
                                    "not be written (No space left on device)")
    assert len(__import__("pandas").read_csv(csv)) == 3


# Item 9: a full disk while saving figures keeps the scores ---------------------------------------------------

TRAIN_FLAGS = ["--epochs", "1", "--batch-size", "8", "--image-size", "32", "--weights", "none", "--device", "cpu",
               "--quiet", "--no-tensorboard"]


def test_a_full_disk_at_the_figures_keeps_the_scores(small_root, tmp_path, monkeypatch, capsys):
    """The checkpoint fits, then every PNG figure meets ENOSPC (the stand-in writes a few bytes first, as a
    full disk does): one warning line per figure, metrics.json with the test scores, no partial PNG."""
    import errno

    from matplotlib.figure import Figure

    def disk_full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    from cxr.evaluate.figures import FigureNotWritten

    monkeypatch.setattr(Figure, "savefig", disk_full)
    out = tmp_path / "out"
    with pytest.warns(FigureNotWritten) as caught:  # the CLI prints each as one "warning: ..." line
        assert main(["train", "resnet50_full", "--data-dir", str(small_root), "--out", str(out), *TRAIN_FLAGS]) == 0
    assert "Traceback" not in capsys.readouterr().err
    run = out / "resnet50_full"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"accuracy", "macro_f1"} and (run / "checkpoints" / "best.pt").is_file()
    assert "curves.png" in metrics["figures_not_written"] and "confusion_matrix.png" in metrics["figures_not_written"]
    lines = [str(warning.message) for warning in caught if warning.category is FigureNotWritten]
    assert len(lines) == len(metrics["figures_not_written"]) >= 5
    assert lines[0] == (f"figure {str(run / 'curves.png')!r} could not be written (No space left on device); the "
                        "scores it shows are kept in the run's JSON files.")
    assert not list(run.glob("*.png"))


# Item 10: SIGTERM during training behaves like Ctrl-C --------------------------------------------------------

def test_sigterm_during_training_keeps_the_epoch_and_removes_the_lock(small_root, tmp_path, monkeypatch, capsys):
    """A real SIGTERM delivered to this process once epoch 1 of 3 is saved (Python's default would end the
    process at once, leaving run.lock)."""
    import signal

    from cxr.train import engine

    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("this test process has its own SIGTERM handler")
    real_save = engine.RunFiles.save

    def save_then_terminated(self, state, is_best):
        real_save(self, state, is_best)
        if len(state.history) == 1:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(engine.RunFiles, "save", save_then_terminated)
    out = tmp_path / "out"
    flags = [flag if flag != "1" else "3" for flag in TRAIN_FLAGS[:2]] + TRAIN_FLAGS[2:]
    assert main(["train", "resnet50_full", "--data-dir", str(small_root), "--out", str(out), *flags]) == 143
    err = capsys.readouterr().err
    run = out / "resnet50_full"
    assert "Traceback" not in err and "SIGTERM received: stopping as for Ctrl-C." in err
    assert f"Training interrupted: epoch 1 of 3 saved in {str(run / 'checkpoints' / 'last.pt')!r}" in err
    assert "Resume with: cxr train resnet50_full" in err and "--resume" in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert not (run / "run.lock").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is only there while cxr runs


# Item 18: demo uploads are deleted after use and at server stop ----------------------------------------------

def test_demo_uploads_are_deleted_after_use_and_at_stop(checkpoint, tmp_path, monkeypatch):
    import os
    import socket

    from gradio_client import Client, handle_file

    from cxr.inference.serve import serve

    gradio_dir = tmp_path / "gradio"
    gradio_dir.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(gradio_dir))
    image = write_image(tmp_path / "patient_upload.png", 90, size=48)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo = serve(checkpoint, port=port, device="cpu", block=False)
    try:
        (private,) = gradio_dir.glob("cxr-serve-uploads-*")  # this server's own folder inside $GRADIO_TEMP_DIR
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        first = client.predict(handle_file(str(image)), api_name="/classify")
        assert first[0]["label"] in ("COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS")
        client.predict(handle_file(str(image)), api_name="/classify")
        assert not list(private.rglob("patient_upload*"))  # each upload went once it was classified
        assert os.environ["GRADIO_TEMP_DIR"] == str(private)
    finally:
        demo.close()
    assert not private.exists()  # the overlays Gradio kept to show went with the server
    assert not [p for p in gradio_dir.rglob("*") if p.is_file()]
    assert os.environ["GRADIO_TEMP_DIR"] == str(gradio_dir)
