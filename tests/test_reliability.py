"""Issue 23: inputs and faults that gave a wrong result, mixed outputs, a dead process or a traceback,
each now refused with one clear line or handled with a note (docs/robustness.md lists them)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cxr.common import runlock
from cxr.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cxr.cli import main
from cxr.config import get_experiment
from cxr.data.dataset import check_image, load_splits, scan_split
from cxr.data.layout import CLASSES
from cxr.train.engine import fit
from cxr.inference.export import ExportError, export_model, load_export
from cxr.data.imageio import ImageReadError, decode_image, frame_square
from cxr.common.runtime import Runtime
from cxr.data.synthetic import write_synthetic_dataset

CPU = Runtime.create("cpu", progress=False)
SMALL_COUNTS = {"train": 5, "val": 2, "test": 1}
TRAIN_FLAGS = ["--epochs", "1", "--batch-size", "8", "--image-size", "32", "--weights", "none", "--device", "cpu",
               "--quiet", "--no-tensorboard"]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("reliability") / "data", SMALL_COUNTS, size=32,
                                   bad_files=False)


def fresh_root(tmp_path: Path) -> Path:
    return write_synthetic_dataset(tmp_path / "data", SMALL_COUNTS, size=32, bad_files=False)


def one_image(root: Path) -> Path:
    return sorted((root / "test" / "NORMAL").iterdir())[0]


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# BAD 1: extreme shapes -----------------------------------------------------------------------------------

def test_thin_images_are_skipped_per_file_and_the_others_classified(checkpoint, small_root, tmp_path, capsys):
    Image.new("L", (1, 100_000)).save(tmp_path / "thin_100k.png")
    Image.new("L", (80_000_000, 1)).save(tmp_path / "thin_80m.png")  # 77 KB; gave an OverflowError
    Image.new("L", (60, 1000), 128).save(tmp_path / "strip.png")  # sides fine, aspect ratio 16.7:1
    good = one_image(small_root)
    assert main(["predict", str(tmp_path / "thin_100k.png"), str(tmp_path / "thin_80m.png"), str(tmp_path / "strip.png"),
                 str(good), "--checkpoint", checkpoint, "--device", "cpu", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "image of 80000000 x 1 pixels: a side under 8 px" in captured.err
    assert "image of 60 x 1000 pixels: aspect ratio 16.7:1 is beyond 6:1" in captured.err
    assert "1 image(s) classified, 3 skipped" in captured.out and "Traceback" not in captured.err
    with pytest.raises(ImageReadError, match="a side under 8 px"):
        decode_image(tmp_path / "thin_100k.png", 256)  # the decoder itself refuses too, before decoding


def test_audit_and_training_skip_the_same_extreme_shapes(tmp_path):
    root = fresh_root(tmp_path)
    Image.new("L", (1, 400_000)).save(root / "train" / "NORMAL" / "thin.png")
    assert check_image(root / "train" / "NORMAL" / "thin.png").startswith("image of 1 x 400000 pixels")
    split = scan_split(root, "train")
    assert [(p.name, why.split(":")[0]) for p, why in split.skipped] == [("thin.png", "image of 1 x 400000 pixels")]
    from cxr.audit.data_audit import audit_dataset

    report = audit_dataset(root, progress=False, cache_dir=tmp_path / "cache")
    assert [entry["path"] for entry in report["splits"]["train"]["skipped"]] == ["train/NORMAL/thin.png"]


def test_only_the_centre_square_is_resampled(tmp_path):
    """A 6:1 image (the widest allowed) gives what its centre square gives, but for the first and last rows,
    where the antialiasing filter reaches one source pixel across the crop (as when the whole was resized)."""
    rng = np.random.default_rng(0)
    tall = rng.integers(0, 256, (600, 100), dtype=np.uint8)
    whole, centre = frame_square(Image.fromarray(tall), 50), frame_square(Image.fromarray(tall[250:350]), 50)
    assert whole.shape == (50, 50) and np.abs(whole[1:-1].astype(int) - centre[1:-1].astype(int)).max() <= 1
    other = frame_square(Image.fromarray(tall[200:300]), 50)
    assert np.abs(whole[1:-1].astype(int) - other[1:-1].astype(int)).max() > 1


def test_demo_page_refuses_uploads_over_its_limit(checkpoint, tmp_path, monkeypatch):
    import httpx

    from cxr.inference.serve import MAX_UPLOAD_BYTES, serve

    assert MAX_UPLOAD_BYTES == 64 * 2**20
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo = serve(checkpoint, port=port, device="cpu", block=False, max_upload_bytes=4096)
    try:
        url = f"http://127.0.0.1:{port}/gradio_api/upload"
        small = httpx.post(url, files={"files": ("small.png", b"x" * 1000)}, timeout=30)
        large = httpx.post(url, files={"files": ("large.png", b"x" * 10_000)}, timeout=30)
    finally:
        demo.close()
    assert small.status_code == 200 and large.status_code == 413


# BAD 2: one run per experiment folder --------------------------------------------------------------------

def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(tmp_path):
    with runlock.hold_folder(tmp_path / "exp", "cxr train"):
        holder = json.loads((tmp_path / "exp" / runlock.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
        with pytest.raises(runlock.FolderLockedError, match=rf"in use by cxr train \(PID {os.getpid()} on "):
            with runlock.hold_folder(tmp_path / "exp", "cxr train"):
                pass
    assert not (tmp_path / "exp" / runlock.LOCK_FILE).exists()  # released at the end
    with runlock.hold_folder(tmp_path / "exp", "cxr train"):
        pass


def test_cli_train_is_refused_while_another_live_run_holds_the_folder(small_root, tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = tmp_path / "out" / "resnet50_full"
        folder.mkdir(parents=True)
        lock = {"pid": sleeper.pid, "host": socket.gethostname(), "command": "cxr train",
                "started": "2026-01-01T00:00:00+00:00"}
        (folder / runlock.LOCK_FILE).write_text(json.dumps(lock))
        argv = ["train", "resnet50_full", "--data-dir", str(small_root), "--out", str(tmp_path / "out"), *TRAIN_FLAGS]
        assert main(argv) == 1
        line = error_line(capsys)
        assert line.startswith("error: ") and f"PID {sleeper.pid}" in line and "2026-01-01T00:00:00" in line
        assert not (folder / "checkpoints").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_lock_is_taken_over_with_a_note_and_another_hosts_lock_is_refused(tmp_path):
    folder = tmp_path / "exp"
    folder.mkdir()
    pid = dead_pid()
    (folder / runlock.LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    with pytest.warns(UserWarning, match=rf"PID {pid} .* no longer runs \(stale lock removed\)"):
        with runlock.hold_folder(folder, "cxr train"):
            assert runlock.read_lock(folder / runlock.LOCK_FILE)["pid"] == os.getpid()
    (folder / runlock.LOCK_FILE).write_text(json.dumps({"pid": pid, "host": "elsewhere", "started": "x"}))
    with pytest.raises(runlock.FolderLockedError, match="on elsewhere.*If that run is gone, delete"):
        with runlock.hold_folder(folder, "cxr train"):
            pass


# BAD 3: class folders that differ only in case ----------------------------------------------------------

def test_class_folders_differing_in_case_are_merged_with_a_note(tmp_path):
    root = fresh_root(tmp_path)
    lower = root / "train" / "normal"
    lower.mkdir()
    for path in sorted((root / "train" / "NORMAL").iterdir())[:2]:
        shutil.copy(path, lower / f"copy_{path.name}")
    with pytest.warns(UserWarning, match=r"2 folders of class NORMAL \(NORMAL/, normal/\); their images are merged"):
        split = scan_split(root, "train")
    normal = [p for p, label in zip(split.paths, split.labels) if CLASSES[label] == "NORMAL"]
    assert len(normal) == SMALL_COUNTS["train"] + 2 and sum(p.parent.name == "normal" for p in normal) == 2


# BAD 4 and POOR: model.json checked against model.onnx ----------------------------------------------------

@pytest.fixture(scope="module")
def export_dir(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "export"
    export_model(checkpoint, out)
    return out


def edited_export(export_dir: Path, folder: Path, edit) -> Path:
    """A copy of the export (the large files linked, not copied) whose model.json ``edit`` changed."""
    folder.mkdir()
    for name in ("model.onnx", "model.safetensors"):
        (folder / name).symlink_to(export_dir / name)
    description = json.loads((export_dir / "model.json").read_text())
    edit(description)
    (folder / "model.json").write_text(json.dumps(description))
    return folder


def _set(path: str, value):
    def edit(description):
        *parents, last = path.split(".")
        target = description
        for key in parents:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return edit


@pytest.mark.parametrize("path, value, message", [
    ("classes", ["NORMAL", "COVID19", "PNEUMONIA", "TUBERCULOSIS"], r"'classes' is \['NORMAL', 'COVID19'.*model.onnx says"),
    ("classes", ["A", "B", "C", "D"], r"field 'classes' is \['A', 'B', 'C', 'D'\], but model.onnx says"),
    ("classes", "ABCD", r"field 'classes' must be a list of two or more distinct class names, not 'ABCD'"),
    ("classes", ["COVID19", "NORMAL", "PNEUMONIA"], r"field 'classes' is \['COVID19', 'NORMAL', 'PNEUMONIA'\]"),
    ("classes", KeyError, r"field 'classes' must be a list .* not None"),
    ("preprocessing", KeyError, r"field 'preprocessing' is missing"),
    ("image_size", 64, r"field 'image_size' \(64\) differs from preprocessing.image_size \(32\)"),
    ("preprocessing.mean", "0.5", r"field 'preprocessing.mean' must be three numbers \(R, G, B\), not '0.5'"),
    ("preprocessing.resize", 99, r"field 'preprocessing.resize' is 99, but model.onnx says \d+"),
])
def test_an_edited_model_json_is_refused_naming_the_field(export_dir, tmp_path, capsys, path, value, message):
    folder = edited_export(export_dir, tmp_path / "edited", _set(path, value))
    with pytest.raises(ExportError, match=message):
        load_export(folder)
    image = tmp_path / "image.png"
    Image.new("L", (40, 40), 100).save(image)
    assert main(["predict", str(image), "--checkpoint", str(folder), "--device", "cpu", "--quiet"]) == 1
    assert error_line(capsys).startswith(f"error: {str(folder / 'model.json')!r}: field ")


def test_an_image_size_edited_consistently_is_caught_by_the_onnx_shape(export_dir, tmp_path):
    def edit(description):
        description["image_size"] = description["preprocessing"]["image_size"] = 64
    with pytest.raises(ExportError, match=r"field 'image_size' is 64, but model.onnx says 32"):
        load_export(edited_export(export_dir, tmp_path / "edited", edit))


# BAD 5: --resume on changed data --------------------------------------------------------------------------

def tiny_experiment(**changes):
    return get_experiment("resnet50_full", **{"epochs": 2, "batch_size": 8, "image_size": 32, "weights": "none",
                                              **changes})


def test_resume_refuses_swapped_images_with_the_same_counts(tmp_path):
    root = fresh_root(tmp_path)
    fit(tiny_experiment(epochs=1), load_splits(root, val_source="given"), tmp_path / "run", CPU, seed=3)
    target = sorted((root / "train" / "NORMAL").glob("*.png"))[0]
    other = sorted((root / "train" / "PNEUMONIA").glob("*.png"))[0]
    shutil.copy(other, target)  # one image swapped for another: same counts, same names
    with pytest.raises(CheckpointError, match=r"the train image files differ .*the per-class counts are the same"):
        fit(tiny_experiment(epochs=1), load_splits(root, val_source="given"), tmp_path / "run", CPU, seed=3,
            resume=True)


def test_a_checkpoint_without_file_signatures_resumes_on_counts_with_a_warning(tmp_path):
    root = fresh_root(tmp_path)
    splits = load_splits(root, val_source="given")
    fit(tiny_experiment(epochs=1), splits, tmp_path / "run", CPU, seed=3)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    del state["data"]["files"]
    save_checkpoint(state, last)
    with pytest.warns(UserWarning, match="predates file signatures: only the per-class image counts"):
        result = fit(tiny_experiment(epochs=1), splits, tmp_path / "run", CPU, seed=3, resume=True)
    assert len(result.history) == 1


# BAD 6 and POOR: checkpoints that cannot predict ------------------------------------------------------------

def _damaged_checkpoint(checkpoint: str, tmp_path: Path, change) -> Path:
    state = load_checkpoint(checkpoint)
    change(state)
    return save_checkpoint(state, tmp_path / "damaged.pt")


def _nan_weight(state):
    state["model"]["head.weight"][0, 0] = float("nan")


def _huge_weights(state):  # each weight finite, the output not: 1e30 times 1e30 overflows float32
    state["model"]["head.weight"].fill_(1e30)
    state["model"]["head.bias"].fill_(1e30)
    for name, tensor in state["model"].items():
        if name.endswith("bn3.weight"):
            tensor.fill_(1e30)


@pytest.mark.parametrize("change, message", [
    (_nan_weight, r"holds non-finite weights \(NaN or infinity in 'head.weight'\)"),
    (lambda state: state["model"].clear(), "holds no model weights"),
    (lambda state: state.update(experiment={"name": "resnet50_full"}), "has incomplete experiment settings"),
    (lambda state: state["model"].update({"head.weight": torch.zeros(3, 2048), "head.bias": torch.zeros(3)}),
     r"do not fit its resnet50 model with 4 classes \(size mismatch for head.weight"),
])
def test_a_checkpoint_that_cannot_predict_is_refused_by_every_command(checkpoint, small_root, tmp_path, capsys,
                                                                      change, message):
    damaged = _damaged_checkpoint(checkpoint, tmp_path, change)
    image = one_image(small_root)
    commands = [["predict", str(image), "--checkpoint", str(damaged), "--device", "cpu", "--quiet"],
                ["evaluate", "resnet50_full", "--checkpoint", str(damaged), "--data-dir", str(small_root),
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"],
                ["export", "--checkpoint", str(damaged), "--out", str(tmp_path / "export")]]
    for argv in commands:
        assert main(argv) == 1, argv[0]
        line = error_line(capsys)
        assert line.startswith("error: ") and __import__("re").search(message, line), (argv[0], line)
    assert not (tmp_path / "out").exists() and not (tmp_path / "export").exists()


def test_finite_weights_with_non_finite_outputs_are_refused(checkpoint, tmp_path):
    from cxr.inference.trained_model import load_trained_model

    damaged = _damaged_checkpoint(checkpoint, tmp_path, _huge_weights)
    with pytest.raises(CheckpointError, match="gives non-finite outputs"):
        load_trained_model(damaged)


def test_an_export_with_non_finite_weights_is_refused(export_dir, tmp_path):
    folder = edited_export(export_dir, tmp_path / "edited", lambda description: None)
    tensors = load_file(str(export_dir / "model.safetensors"))
    tensors["head.bias"][1] = float("inf")
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ExportError, match=r"non-finite weights \(NaN or infinity in 'head.bias'\)"):
        load_export(folder)


# POOR: tracebacks become one line, checked before the work ------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["resnet50_full", "--device", "foo"], "error: --device 'foo' is not a device; use cuda, cuda:N, mps or cpu."),
    (["vit_b16_head", "--image-size", "7"], "error: --image-size 7 is outside 32-1024 px"),
    (["vit_b16_head", "--image-size", "40"], "error: --image-size 40 does not suit vit_b_16: it cuts the image "
                                             "into 16 px patches, so the size must be a multiple of 16 (e.g. 32)."),
    (["resnet50_full", "--image-size", "100000"], "error: --image-size 100000 is outside 32-1024 px"),
    (["resnet50_full", "--image-size", "1"], "error: --image-size 1 is outside 32-1024 px: below 32 a resnet50 sees"),
])
def test_bad_train_settings_are_refused_before_the_data_is_read(flags, message, tmp_path, capsys):
    """The data folder does not exist: an error about the flag proves it was checked first."""
    argv = ["train", *flags, "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 1
    assert error_line(capsys).startswith(message)


def test_outputs_that_cannot_be_written_are_refused_before_the_work(checkpoint, small_root, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("in the way")
    assert main(["audit", "--data-dir", str(small_root), "--out", str(a_file), "--quiet"]) == 1
    assert error_line(capsys) == f"error: --out {str(a_file)!r} is a file, not a folder; give a folder."
    image = one_image(small_root)
    assert main(["predict", str(image), "--checkpoint", checkpoint, "--cam", str(a_file), "--device", "cpu"]) == 1
    assert error_line(capsys) == f"error: --cam {str(a_file)!r} is a file, not a folder; give a folder."
    assert main(["predict", str(image), "--checkpoint", checkpoint, "--csv", str(tmp_path), "--device", "cpu"]) == 1
    assert error_line(capsys) == f"error: --csv {str(tmp_path)!r} is a folder, not a file name."
    argv = ["train", "resnet50_full", "--data-dir", str(small_root), "--out", str(a_file / "sub"), *TRAIN_FLAGS]
    assert main(argv) == 1
    assert error_line(capsys) == (f"error: --out {str(a_file / 'sub')!r} cannot be written "
                                  f"({str(a_file)!r} is a file).")


def _sys_is_read_only() -> bool:
    try:
        (Path("/sys") / "cxr-probe").mkdir()
    except OSError:
        return Path("/sys").is_dir()
    (Path("/sys") / "cxr-probe").rmdir()
    return False


@pytest.mark.skipif(not _sys_is_read_only(), reason="needs a read-only file system (/sys on Linux)")
def test_a_read_only_out_is_refused_before_the_audit(small_root, capsys):
    out = Path("/sys") / "cxr-test-out"
    argv = ["train", "resnet50_full", "--data-dir", str(small_root), "--out", str(out), *TRAIN_FLAGS]
    assert main(argv) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: cannot write into the experiment folder {str(out / 'resnet50_full')!r}")


def test_misleading_checkpoint_messages_are_now_plain(export_dir, small_root, tmp_path, capsys):
    argv = ["evaluate", "resnet50_full", "--checkpoint", str(export_dir), "--data-dir", str(small_root),
            "--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 1
    assert error_line(capsys).startswith(f"error: --checkpoint {str(export_dir)!r} is a folder (an export?)")
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=r"is not a cxr checkpoint \(not a file written by torch.save\)\.$"):
        load_checkpoint(random_bytes)


# POOR: silences -------------------------------------------------------------------------------------------

def test_images_in_subfolders_and_broken_symlinks_are_counted_in_the_warning(tmp_path):
    root = fresh_root(tmp_path)
    nested = root / "train" / "COVID19" / "more"
    nested.mkdir()
    for path in sorted((root / "train" / "COVID19").glob("*.*"))[:3]:
        shutil.copy(path, nested / path.name)
    (root / "train" / "NORMAL" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.warns(UserWarning, match=r"Skipped 4 unusable file\(s\)"):
        splits = load_splits(root, val_source="given")
    reasons = {p.name: why for p, why in splits.train.skipped}
    assert reasons["gone.png"] == "broken symbolic link"
    assert sum(why == "in the subfolder more/ of COVID19/, which is not scanned" for why in reasons.values()) == 3


# POOR: after a kill ---------------------------------------------------------------------------------------

def test_a_later_run_removes_temporaries_of_dead_runs_and_history_follows_the_checkpoint(tmp_path, small_root):
    splits = load_splits(small_root, val_source="given")
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead, alive = checkpoints / f".last.pt.{dead_pid()}.tmp", checkpoints / f".last.pt.{sleeper.pid}.tmp"
    dead.write_bytes(b"half a checkpoint")
    alive.write_bytes(b"another live run's")
    try:
        with pytest.warns(UserWarning, match=rf"Removed 1 temporary file\(s\) .*{dead.name}"):
            fit(tiny_experiment(epochs=1), splits, tmp_path / "run", CPU, seed=3)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not dead.exists() and alive.exists()
    # A run killed after its history but before its checkpoint (the old order) listed an epoch last.pt lacks;
    # resuming rewrites history.csv from last.pt (here nothing is left to train, so nothing else writes it).
    history = tmp_path / "run" / "history.csv"
    lines = history.read_text().splitlines()
    history.write_text("\n".join([*lines, lines[-1].replace("1,", "2,", 1)]) + "\n")
    fit(tiny_experiment(epochs=1), splits, tmp_path / "run", CPU, seed=3, resume=True)
    assert history.read_text().splitlines() == lines and load_checkpoint(checkpoints / "last.pt")["epoch"] == 1


def test_history_is_written_only_after_the_checkpoint(tmp_path, small_root, monkeypatch):
    """Disk full while writing epoch 2's checkpoint: history.csv still lists epoch 1 only, like last.pt."""
    import errno

    from cxr.models import checkpoint

    real_save = torch.save

    def disk_full_in_epoch_two(obj, target, *args, **kwargs):
        if obj["epoch"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full_in_epoch_two)
    with pytest.raises(CheckpointError, match="No space left on device"):
        fit(tiny_experiment(epochs=2), load_splits(small_root, val_source="given"), tmp_path / "run", CPU, seed=3)
    rows = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("1,")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 1
