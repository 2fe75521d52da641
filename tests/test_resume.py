"""Ctrl-C during training keeps every finished epoch, and --resume continues exactly where the run stopped."""

from __future__ import annotations

import csv
import json
import re
import shlex
import signal

import pytest
import torch

from cxr.train import engine
from cxr.models.checkpoint import CheckpointError, load_checkpoint
from cxr.cli import main
from cxr.config import get_experiment
from cxr.data.dataset import load_splits
from cxr.train.engine import TrainingInterrupted, fit
from cxr.common.runtime import Runtime
from cxr.data.synthetic import write_synthetic_dataset

CPU = Runtime.create("cpu", progress=False)
SMALL_COUNTS = {"train": 5, "val": 2, "test": 1}


@pytest.fixture(autouse=True)
def ctrl_c_raises_keyboard_interrupt():
    """Python's own SIGINT handler for these tests: a shell starts background jobs (``pytest &``, nohup)
    with SIGINT ignored, and Python then never turns SIGINT into KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """Smaller than the shared synthetic set (20 training images): these tests train several runs."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("resume") / "data", SMALL_COUNTS, size=32, bad_files=False)


@pytest.fixture(scope="module")
def splits(small_root):
    return load_splits(small_root, val_source="given")


def tiny_experiment(**changes):
    settings = {"epochs": 3, "batch_size": 8, "image_size": 32, "weights": "none", **changes}
    return get_experiment("resnet50_full", **settings)


def ctrl_c_after_epoch(epoch: int):
    """An on_epoch_end callback that delivers a real SIGINT once ``epoch`` epochs are done."""

    def callback(history):
        if len(history) == epoch:
            signal.raise_signal(signal.SIGINT)

    return callback


def without_timings(state: dict) -> dict:
    state = dict(state)
    state.pop("train_seconds")
    state["history"] = [{k: v for k, v in row.items() if k != "seconds"} for row in state["history"]]
    return state


def assert_identical(a, b, where: str = "checkpoint") -> None:
    """Exact equality of nested checkpoint contents: tensors with torch.equal, everything else with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}/{index}")
    else:
        assert a == b, where


def read_history(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def test_interrupted_and_resumed_run_matches_uninterrupted_run(splits, tmp_path):
    experiment = tiny_experiment()
    full = fit(experiment, splits, tmp_path / "full", CPU, seed=3)

    with pytest.raises(TrainingInterrupted, match=r"epoch 1 of 3 saved in .*last\.pt.*--resume") as caught:
        fit(experiment, splits, tmp_path / "resumed", CPU, seed=3, on_epoch_end=ctrl_c_after_epoch(1))
    assert caught.value.saved_epochs == 1
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["epoch"] == 1
    resumed = fit(experiment, splits, tmp_path / "resumed", CPU, seed=3, resume=True)

    for name in ("last.pt", "best.pt"):  # model, optimizer, scheduler, history, early-stopping state
        assert_identical(without_timings(load_checkpoint(tmp_path / "full" / "checkpoints" / name)),
                         without_timings(load_checkpoint(tmp_path / "resumed" / "checkpoints" / name)), name)
    assert_identical(full.model.state_dict(), resumed.model.state_dict(), "returned model")
    assert (full.best_epoch, full.stopped_early) == (resumed.best_epoch, resumed.stopped_early)
    assert read_history(tmp_path / "full" / "history.csv") == read_history(tmp_path / "resumed" / "history.csv")
    assert len(resumed.history) == 3


def test_early_stopping_state_survives_resume(splits, tmp_path, monkeypatch):
    def flat_validation(*args, **kwargs):  # validation never improves after epoch 1
        return {"loss": 1.0, "accuracy": 0.25, "macro_f1": 0.1, "balanced_accuracy": 0.25}

    monkeypatch.setattr(engine, "evaluate", flat_validation)
    experiment = tiny_experiment(epochs=4, patience=1)
    with pytest.raises(TrainingInterrupted):
        fit(experiment, splits, tmp_path, CPU, seed=3, on_epoch_end=ctrl_c_after_epoch(2))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["bad_epochs"] == 1

    resumed = fit(experiment, splits, tmp_path, CPU, seed=3, resume=True)
    # Patience 1 was used up by epoch 2, so the resumed run stops before training epoch 3.
    assert resumed.stopped_early and len(resumed.history) == 2 and resumed.best_epoch == 1


def test_fit_returns_the_best_epoch_without_reading_best_pt_back(splits, tmp_path, monkeypatch):
    """The best epoch's weights are kept from the host copy that best.pt was written from; only a run that
    trained no new best epoch (a resumed one) reads the file."""
    def flat_validation(*args, **kwargs):  # epoch 1 stays the best
        return {"loss": 1.0, "accuracy": 0.25, "macro_f1": 0.1, "balanced_accuracy": 0.25}

    monkeypatch.setattr(engine, "evaluate", flat_validation)
    reads = []
    monkeypatch.setattr(engine, "load_checkpoint", lambda *args, **kwargs: reads.append(args) or load_checkpoint(*args, **kwargs))
    result = fit(tiny_experiment(epochs=2), splits, tmp_path, CPU, seed=3)
    assert result.best_epoch == 1 and reads == []
    best, last = (load_checkpoint(tmp_path / "checkpoints" / name)["model"] for name in ("best.pt", "last.pt"))
    assert_identical(result.model.state_dict(), best, "returned model")
    assert not torch.equal(best["head.weight"], last["head.weight"])


def test_interrupt_before_first_epoch_ends_says_nothing_to_resume(splits, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train_one_epoch", interrupted)
    with pytest.raises(TrainingInterrupted, match="no epoch was finished") as caught:
        fit(tiny_experiment(), splits, tmp_path, CPU)
    assert caught.value.saved_epochs == 0 and not (tmp_path / "checkpoints" / "last.pt").exists()


def test_resume_with_other_settings_is_refused(splits, tmp_path):
    experiment = tiny_experiment(epochs=1)
    fit(experiment, splits, tmp_path, CPU, seed=3)
    with pytest.raises(CheckpointError, match=r"epochs=1 \(now 2\)"):
        fit(tiny_experiment(epochs=2), splits, tmp_path, CPU, seed=3, resume=True)
    with pytest.raises(CheckpointError, match=r"seed=3 \(now 4\)"):
        fit(experiment, splits, tmp_path, CPU, seed=4, resume=True)


def test_resume_may_change_how_the_run_executes(splits, tmp_path):
    """The image cache, torch.compile and the feature cache are how a run executes (the Runtime's), not what
    it trains: a run interrupted with the image cache resumes without it, also from a checkpoint written
    when the experiment's configuration still held those choices."""
    from cxr.models.checkpoint import save_checkpoint

    experiment = tiny_experiment(epochs=2)
    with pytest.raises(TrainingInterrupted):
        fit(experiment, splits, tmp_path, CPU, seed=3, on_epoch_end=ctrl_c_after_epoch(1))
    last = tmp_path / "checkpoints" / "last.pt"
    older = load_checkpoint(last)
    older["experiment"] |= {"cache": True, "compile": False, "feature_cache": "auto"}
    save_checkpoint(older, last)
    resumed = fit(experiment, splits, tmp_path, CPU.replace(cache=False), seed=3, resume=True)
    assert len(resumed.history) == 2 and resumed.extra["pipeline"]["cache"] is False


def test_cli_ctrl_c_exits_130_with_resume_command_that_works(small_root, tmp_path, monkeypatch, capsys):
    real_train_one_epoch = engine.train_one_epoch
    calls = []

    def ctrl_c_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real_train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", ctrl_c_in_second_epoch)
    argv = ["train", "resnet50_full", "--data-dir", str(small_root), "--val-source", "given", "--epochs", "2",
            "--batch-size", "8", "--image-size", "32", "--weights", "none", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 130
    error = capsys.readouterr().err
    assert "epoch 1 of 2 saved" in error and "Traceback" not in error
    command = re.search(r"Resume with: (.+)", error).group(1)
    assert shlex.split(command) == ["cxr", *argv, "--resume"]

    assert main(shlex.split(command)[1:]) == 0
    metrics = json.loads((tmp_path / "resnet50_full" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and len(calls) == 3
