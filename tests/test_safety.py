"""Bad checkpoints, bad data and training failures end in a clear message, never in lost work or a wrong answer."""

from __future__ import annotations

import contextlib
import errno
import math
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from cxr.models import checkpoint
from cxr.train import engine
from cxr import workflow
from cxr.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cxr.cli import main
from cxr.config import get_experiment
from cxr.data.dataset import load_splits
from cxr.data.layout import CLASSES
from cxr.train.engine import TrainingError, fit
from cxr.models.classifier import build_model, preprocessing
from cxr.common.runtime import Runtime
from cxr.data.synthetic import write_synthetic_dataset

CPU = Runtime.create("cpu", progress=False)
SMALL_COUNTS = {"train": 5, "val": 2, "test": 1}
TRAIN_FLAGS = ["--val-source", "given", "--batch-size", "8", "--image-size", "32", "--weights", "none", "--quiet"]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """20 training images: enough for the refusal paths, cheap for the runs that train."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("safety") / "data", SMALL_COUNTS, size=32, bad_files=False)


@pytest.fixture(scope="module")
def resnet50_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint shaped exactly like the ones fit writes (untrained weights: only refusals are tested)."""
    experiment = get_experiment("resnet50_full", image_size=32, weights="none")
    state = {
        "model": build_model("resnet50", len(CLASSES), "none", "all", 32).state_dict(),
        "experiment": experiment.to_dict(),
        "classes": list(CLASSES),
        "epoch": 1,
        "preprocessing": preprocessing("resnet50", 32),
        "seed": 42,
    }
    return save_checkpoint(state, tmp_path_factory.mktemp("checkpoints") / "best.pt")


def evaluate_cli(checkpoint_path: Path, experiment: str, data_root: Path, out: Path) -> list[str]:
    return ["evaluate", experiment, "--checkpoint", str(checkpoint_path), "--data-dir", str(data_root),
            "--out", str(out), "--quiet"]


def test_cli_evaluate_refuses_checkpoint_of_another_experiment(resnet50_checkpoint, small_root, tmp_path, capsys):
    assert main(evaluate_cli(resnet50_checkpoint, "resnet152_head", small_root, tmp_path)) == 1
    error = capsys.readouterr().err
    assert "belongs to experiment 'resnet50_full', not 'resnet152_head'" in error and "Traceback" not in error
    assert not (tmp_path / "resnet152_head").exists()


def test_cli_evaluate_refuses_checkpoint_with_other_classes(resnet50_checkpoint, small_root, tmp_path, capsys):
    state = load_checkpoint(resnet50_checkpoint)
    state["classes"] = ["NORMAL", "PNEUMONIA"]
    other = save_checkpoint(state, tmp_path / "two_classes.pt")
    assert main(evaluate_cli(other, "resnet50_full", small_root, tmp_path)) == 1
    error = capsys.readouterr().err
    assert "trained on classes ['NORMAL', 'PNEUMONIA'], not ['COVID19', 'NORMAL', 'PNEUMONIA', 'TUBERCULOSIS']" in error


def test_resume_refuses_checkpoint_of_another_architecture(resnet50_checkpoint, small_root, tmp_path):
    state = load_checkpoint(resnet50_checkpoint)
    state["experiment"] = {**state["experiment"], "arch": "resnet152"}
    save_checkpoint(state, tmp_path / "checkpoints" / "last.pt")
    splits = load_splits(small_root, val_source="given")
    experiment = get_experiment("resnet50_full", image_size=32, weights="none")
    with pytest.raises(CheckpointError, match="holds a 'resnet152' model, not 'resnet50'"):
        fit(experiment, splits, tmp_path, CPU, resume=True)


@pytest.mark.parametrize(
    "content",
    [b"", b"just some text\n", pickle.dumps({"model": {}}, protocol=2), "tensor", "dict-without-format"],
    ids=["zero-byte", "text", "plain-pickle-dict", "torch-tensor", "torch-dict"],
)
def test_file_that_is_not_a_checkpoint_is_refused(content, tmp_path):
    path = tmp_path / "not_a_checkpoint.pt"
    if content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "dict-without-format":
        torch.save({"model": {}, "epoch": 1}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a cxr checkpoint"):
        load_checkpoint(path)


class CreatesFile:
    """Unpickling this calls open(target, "w"): a file appears if a loader executes pickled code."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def write_malicious(path: Path, target: Path, kind: str) -> None:
    if kind == "torch-zip":
        torch.save({"format": checkpoint.FORMAT, "model": CreatesFile(target)}, path)
    else:
        path.write_bytes(pickle.dumps(CreatesFile(target), protocol=2))  # the protocol torch.load expects


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_malicious_pickle_is_refused_without_running_it(kind, resnet50_checkpoint, small_root, tmp_path, capsys):
    control_target, target = tmp_path / "control_created", tmp_path / "pwned"
    # Control: an unsafe loader really would create the file, so the checks below can fail.
    write_malicious(tmp_path / "control.pt", control_target, kind)
    with open(tmp_path / "control.pt", "rb") as handle:
        created = torch.load(handle, weights_only=False) if kind == "torch-zip" else pickle.load(handle)
    (created["model"] if kind == "torch-zip" else created).close()
    assert control_target.exists()

    evil = tmp_path / "evil.pt"
    write_malicious(evil, target, kind)
    with pytest.raises(CheckpointError, match="refused without running them"):
        load_checkpoint(evil)
    assert main(evaluate_cli(evil, "resnet50_full", small_root, tmp_path / "out")) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "refused without running them" in error and "Traceback" not in error
    assert not target.exists()


def test_missing_checkpoint_and_resume_without_checkpoint_are_clear_errors(small_root, tmp_path, capsys):
    assert main(evaluate_cli(tmp_path / "missing.pt", "resnet50_full", small_root, tmp_path)) == 1
    assert "missing.pt' does not exist" in capsys.readouterr().err
    argv = ["train", "resnet50_full", "--data-dir", str(small_root), "--out", str(tmp_path), "--resume", *TRAIN_FLAGS]
    assert main(argv) == 1
    assert "--resume was given but" in capsys.readouterr().err


def test_disk_full_during_training_keeps_previous_checkpoint(small_root, tmp_path, monkeypatch, capsys):
    real_save, saves = torch.save, []

    def disk_full_after_first_epoch(obj, target, *args, **kwargs):
        saves.append(obj["epoch"])
        if obj["epoch"] == 2:
            Path(target).write_bytes(b"the first bytes of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full_after_first_epoch)
    argv = ["train", "resnet50_full", "--data-dir", str(small_root), "--out", str(tmp_path), "--epochs", "2", *TRAIN_FLAGS]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "Could not write checkpoint" in error and "No space left on device" in error and "Traceback" not in error
    checkpoints = tmp_path / "resnet50_full" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt"]  # no temporary file left
    assert load_checkpoint(checkpoints / "last.pt")["epoch"] == 1 and saves[-1] == 2


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(small_root, tmp_path, monkeypatch):
    real_train_one_epoch, calls = engine.train_one_epoch, []

    def weights_diverge_in_epoch_2(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                model.head.weight.fill_(math.inf)
        return real_train_one_epoch(model, *args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", weights_diverge_in_epoch_2)
    splits = load_splits(small_root, val_source="given")
    experiment = get_experiment("resnet50_full", epochs=3, batch_size=8, image_size=32, weights="none")
    with pytest.raises(TrainingError, match=r"loss became nan in epoch 2; the last good checkpoint \(epoch 1\)"):
        fit(experiment, splits, tmp_path, CPU)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    assert len(calls) == 2  # stopped at once, no epoch 3


def test_out_of_memory_suggests_smaller_batch_size(monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(workflow, "train_experiment", out_of_memory)
    assert main(["train", "resnet50_full", "--quiet"]) == 1
    assert "try a smaller --batch-size" in capsys.readouterr().err


def _without_class(root: Path) -> None:
    """Every TUBERCULOSIS training image replaced by a corrupt one: the folder exists, no usable image."""
    folder = root / "train" / "TURBERCULOSIS"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")


@pytest.mark.parametrize(
    ("damage", "message", "warned"),
    [
        (lambda root: shutil.rmtree(root), "does not exist", None),
        (lambda root: (root / "train").rename(root / "training"), "No train/ and test/ folders found", None),
        (lambda root: shutil.rmtree(root / "test" / "NORMAL"), r"Class folder\(s\) NORMAL missing", None),
        (_without_class, "train split in .* has no usable images of TUBERCULOSIS",
         "Skipped 1 unusable file|The train split has no images of TUBERCULOSIS"),  # the scan and the audit
    ],
    ids=["missing-dataset", "wrong-layout", "missing-class", "empty-class"],
)
def test_bad_dataset_is_refused_before_training(damage, message, warned, tmp_path, capsys):
    root = write_synthetic_dataset(tmp_path / "data", SMALL_COUNTS, size=32, bad_files=False)
    damage(root)
    argv = ["train", "resnet50_full", "--data-dir", str(root), "--out", str(tmp_path / "out"), *TRAIN_FLAGS]
    with pytest.warns(UserWarning, match=warned) if warned else contextlib.nullcontext():
        assert main(argv) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "Traceback" not in error
    assert re.search(message, error)
    assert not (tmp_path / "out" / "resnet50_full" / "checkpoints").exists()
