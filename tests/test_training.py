"""End to end through the CLI: `cxr train` writes every asset, `cxr evaluate` reproduces the test metrics.

Each experiment is trained once per module (tiny settings: 32 px, one epoch, random weights; seconds on a
CPU) and every test below asserts on that run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr import workflow
from cxr.models.checkpoint import load_checkpoint
from cxr.data.provenance import git_commit
from cxr.cli import main
from cxr.config import EXPERIMENTS, experiment_from_dict, get_experiment
from cxr.data.dataset import load_splits
from cxr.data.layout import CLASSES
from cxr.train.run_options import RunOptions
from cxr.common.runtime import Runtime

SEED = 3
TINY = {"epochs": 1, "batch_size": 8, "image_size": 32, "weights": "none"}
TINY_FLAGS = [*(f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()), "--device=cpu", f"--seed={SEED}", "--quiet"]
ASSETS = ["curves.png", "confusion_matrix.png", "predictions.png", "classification_report.txt",
          "classification_report.json", "history.csv", "metrics.json", "roc.png", "model_card.md"]


@dataclass
class Run:
    name: str
    out_dir: Path
    exit_code: int
    stdout: str
    metrics: dict
    opened_during_fit: list[Path]


OPENED: list[list[Path]] = []  # while a list is in here, every file Python opens is appended to it


def _record_opened_files(event: str, args: tuple) -> None:
    if OPENED and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED[-1].append(Path(os.fsdecode(args[0])))


sys.addaudithook(_record_opened_files)  # sees every open(), whatever code path (cache, PIL, loaders) reads images


@pytest.fixture(scope="module", params=sorted(EXPERIMENTS))
def run(request, synthetic_root, tmp_path_factory) -> Run:
    """Train one experiment through the CLI, recording which files are opened while fitting."""
    name = request.param
    out = tmp_path_factory.mktemp(f"train-{name}")
    opened_during_fit: list[Path] = []
    real_fit = workflow.fit

    def recording_fit(*args, **kwargs):
        OPENED.append(opened_during_fit)
        try:
            return real_fit(*args, **kwargs)
        finally:
            OPENED.remove(opened_during_fit)

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, pytest.warns(UserWarning, match=r"Skipped \d+ unusable file"):
        patch.setattr(workflow, "fit", recording_fit)
        # Module fixtures start before conftest's function-scoped environment fixtures: set the same here.
        patch.setenv("CXR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cxr-cache"))
        patch.delenv("CXR_DATA_DIR", raising=False)
        with contextlib.redirect_stdout(stdout):
            code = main(["train", name, f"--data-dir={synthetic_root}", f"--out={out}", *TINY_FLAGS])
    metrics_file = out / name / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    yield Run(name, out / name, code, stdout.getvalue(), metrics, opened_during_fit)
    shutil.rmtree(out / name / "checkpoints", ignore_errors=True)  # hundreds of MB for the frozen backbones


@pytest.fixture(scope="module")
def scanned(synthetic_root):
    with pytest.warns(UserWarning, match="Skipped"):
        return load_splits(synthetic_root, seed=SEED)


def test_train_writes_every_asset(run):
    assert run.exit_code == 0
    assert f"{run.name}: test accuracy" in run.stdout
    for name in ASSETS:
        assert (run.out_dir / name).stat().st_size > 0, name
        if name.endswith(".png"):
            with Image.open(run.out_dir / name) as image:
                assert image.format == "PNG" and min(image.size) > 100
    checkpoints = {p.name for p in (run.out_dir / "checkpoints").iterdir()}
    assert {"best.pt", "last.pt"} <= checkpoints and not [n for n in checkpoints if n.endswith(".tmp")]


def in_unit_range(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_metrics_json_has_scores_in_range_and_provenance(run, scanned):
    metrics = run.metrics
    assert metrics["experiment"] == run.name
    assert metrics["config"] == get_experiment(run.name, **TINY).to_dict()
    assert metrics["weights"] == "none"
    assert metrics["epochs_run"] == 1 and metrics["best_epoch"] == 1
    assert metrics["seed"] == SEED
    assert metrics["dataset"]["counts"] == scanned.counts()
    assert metrics["dataset"]["val_source"] == "carve"
    assert metrics["dataset"]["skipped_files"] == len(scanned.skipped) > 0
    assert metrics["device"].startswith("cpu")
    assert metrics["torch"] == torch.__version__
    # a head trained on cached features for one tiny epoch can take under 5 ms, which rounds to 0.00 s
    assert metrics["wall_seconds"] > 0 and metrics["wall_seconds"] >= metrics["train_seconds"] >= 0
    assert metrics["git_commit"] is None or re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", metrics["git_commit"])
    test = metrics["test"]
    for key in ("accuracy", "macro_f1", "weighted_f1", "balanced_accuracy"):
        assert in_unit_range(test[key]), key
    assert test["roc_auc_ovr"] is None or in_unit_range(test["roc_auc_ovr"])
    for name, scores in test["per_class"].items():
        assert scores["auroc"] is None or in_unit_range(scores["auroc"]), name
        point = test["operating_points"][name]
        assert point is None or point["val_sensitivity"] >= 0.9, name
    assert set(test["ci95"]) >= {"accuracy", "macro_f1", "balanced_accuracy", "roc_auc_ovr", "recall", "auroc"}
    assert {k: v["support"] for k, v in test["per_class"].items()} == scanned.test.counts()
    for scores in test["per_class"].values():
        assert all(in_unit_range(scores[k]) for k in ("precision", "recall", "f1"))
    best_val = metrics["best_val"]
    assert in_unit_range(best_val["val_accuracy"]) and in_unit_range(best_val["val_macro_f1"])
    assert math.isfinite(best_val["val_loss"]) and best_val["val_loss"] > 0
    estimated = "estimated from" in metrics["pipeline"]["batchnorm_statistics"]
    assert estimated == (run.name in ("resnet152_head", "mobilenet_v2_head"))  # the frozen backbones with BatchNorm


def test_metrics_json_keeps_the_shortcut_checks(run):
    metrics = json.loads((run.out_dir / "metrics.json").read_text())
    assert metrics["shortcut_baseline"]["train_images"] == sum(metrics["dataset"]["counts"]["train"].values())
    assert set(metrics["shortcut_baseline"]["test"]["ci95"]) >= {"accuracy", "macro_f1", "recall"}
    views = metrics["shortcuts"]["views"]
    assert set(views) == {"as_is", "lungs_hidden", "lungs_only"} and "shortcuts" not in metrics["test"]
    assert views["as_is"]["macro_f1"] == metrics["test"]["macro_f1"]
    assert metrics["shortcuts"]["sentence"] in run.stdout


def test_history_and_report_files(run):
    with open(run.out_dir / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == run.metrics["epochs_run"]
    expected = {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr", "seconds"}
    assert expected <= set(rows[0])
    row = {k: float(rows[0][k]) for k in expected}
    assert row["epoch"] == 1 and row["train_loss"] > 0 and row["val_loss"] > 0 and row["seconds"] > 0 and row["lr"] > 0
    assert 0 <= row["train_accuracy"] <= 1 and 0 <= row["val_accuracy"] <= 1 and 0 <= row["val_macro_f1"] <= 1
    report = json.loads((run.out_dir / "classification_report.json").read_text())
    assert report["accuracy"] == run.metrics["test"]["accuracy"]
    text = (run.out_dir / "classification_report.txt").read_text()
    assert all(name in text for name in CLASSES) and "macro avg" in text and "balanced accuracy" in text


def is_plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def test_checkpoints_carry_classes_and_config_as_plain_data(run):
    best = load_checkpoint(run.out_dir / "checkpoints" / "best.pt", experiment=run.name, classes=CLASSES)
    last = load_checkpoint(run.out_dir / "checkpoints" / "last.pt", experiment=run.name, classes=CLASSES)
    assert best["classes"] == list(CLASSES)
    assert experiment_from_dict(best["experiment"]) == get_experiment(run.name, **TINY)
    for key in ("experiment", "classes", "preprocessing", "history"):
        assert is_plain(best[key]), key
    assert best["epoch"] == run.metrics["best_epoch"] and last["epoch"] == run.metrics["epochs_run"]
    assert all(isinstance(v, torch.Tensor) for v in best["model"].values())


def test_test_split_is_never_read_while_training(run, synthetic_root):
    """Checkpoint selection and early stopping see train and validation images only."""
    assert run.opened_during_fit, "fit opened no file at all: the recording is broken"
    test_folder = (synthetic_root / "test").resolve()
    assert not [p for p in run.opened_during_fit if p.resolve().is_relative_to(test_folder)]


def test_evaluate_reproduces_the_test_metrics(run, synthetic_root, tmp_path, capsys):
    with pytest.warns(UserWarning, match="Skipped"):
        code = main(["evaluate", run.name, f"--checkpoint={run.out_dir / 'checkpoints' / 'best.pt'}",
                     f"--data-dir={synthetic_root}", f"--out={tmp_path}", "--device=cpu", "--quiet"])
    assert code == 0
    assert f"{run.name}: test accuracy" in capsys.readouterr().out
    (evaluation,) = (tmp_path / run.name / "evaluations").iterdir()  # its own folder, never the run's
    report = json.loads((evaluation / "classification_report.json").read_text())
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "roc_auc_ovr"):
        assert report[key] == pytest.approx(run.metrics["test"][key], abs=1e-6), key
    for name, scores in run.metrics["test"]["per_class"].items():
        assert report["per_class"][name] == pytest.approx(scores, abs=1e-6), name
    trained, evaluated = (np.load(folder / "test_logits.npz") for folder in (run.out_dir, evaluation))
    np.testing.assert_array_equal(trained["labels"], evaluated["labels"])
    np.testing.assert_allclose(trained["logits"], evaluated["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "resnet50_full", "--epochs", "0"],
        ["train", "resnet50_full", "--epochs", "x"],
        ["train", "resnet50_full", "--batch-size", "-8"],
        ["train", "resnet50_full", "--lr", "0"],
        ["train", "resnet51_full"],
        ["train", "resnet50_full", "--no-such-flag"],
        ["evaluate", "resnet50_full"],
        [],
    ],
    ids=["epochs-0", "epochs-x", "negative-batch", "zero-lr", "unknown-experiment", "unknown-flag",
         "evaluate-without-checkpoint", "no-command"],
)
def test_bad_flags_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "usage: cxr" in err and "error:" in err and "Traceback" not in err


def test_list_prints_every_experiment():
    result = subprocess.run([sys.executable, "-m", "cxr", "list"], capture_output=True, text=True, check=True)
    for experiment in EXPERIMENTS.values():
        assert f"{experiment.name}: {experiment.summary}" in result.stdout
    assert [int(n) for n in re.findall(r"^\s+epochs\s+(\d+)$", result.stdout, re.M)] == [
        e.epochs for e in EXPERIMENTS.values()
    ]


def test_a_last_batch_of_one_image_is_skipped_while_batchnorm_trains():
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from cxr.train.engine import train_one_epoch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Linear(6, 4))
    data = TensorDataset(torch.randn(9, 3, 2, 2), torch.arange(9) % 4)  # batches of 4, 4 and 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    result = train_one_epoch(model, DataLoader(data, batch_size=4), nn.CrossEntropyLoss(), optimizer, scheduler,
                             Runtime.create("cpu", progress=False))
    assert math.isfinite(result["loss"])
    assert scheduler.last_epoch == 2


def test_git_commit_is_dirty_for_code_changes_not_for_rewritten_results(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    (tmp_path / "assets" / "run").mkdir(parents=True)
    (tmp_path / "assets" / "run" / "metrics.json").write_text("{}")
    (tmp_path / "train.py").write_text("print('v1')\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    clean = git_commit(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{12}", clean)
    (tmp_path / "assets" / "run" / "metrics.json").write_text('{"rerun": true}')
    (tmp_path / "untracked.txt").write_text("scratch")
    assert git_commit(tmp_path) == clean
    (tmp_path / "train.py").write_text("print('v2')\n")
    assert git_commit(tmp_path) == clean + "-dirty"
    assert git_commit(tmp_path.parent / "no-such-folder") is None


def test_the_model_given_is_the_one_that_trains(synthetic_root, tmp_path, monkeypatch):
    """The notebooks build the model to show it, then train that object: no second build, no second load."""
    from cxr.train import engine

    model = workflow.build_experiment_model("vit_b16_head", **TINY)
    again = workflow.build_experiment_model("vit_b16_head", **TINY)
    assert torch.equal(model.head.weight, again.head.weight)  # seeded as train_experiment seeds
    before = model.head.weight.detach().clone()

    def no_second_build(*args, **kwargs):
        raise AssertionError("train_experiment built another model")

    monkeypatch.setattr(engine, "build_model", no_second_build)
    with pytest.warns(UserWarning, match="Skipped"):
        splits = load_splits(synthetic_root, seed=SEED)
        workflow.train_experiment("vit_b16_head", splits=splits, out=tmp_path,
                                  runtime=Runtime.create("cpu", progress=False),
                                  options=RunOptions(tensorboard=False, seed=SEED), model=model, **TINY)
    assert not torch.equal(model.head.weight.detach(), before)  # this very model learned
    best = load_checkpoint(tmp_path / "vit_b16_head" / "checkpoints" / "best.pt")["model"]
    assert torch.equal(best["head.weight"], model.head.weight.detach())


def test_a_model_of_another_configuration_is_refused(synthetic_root, tmp_path):
    from cxr.train.engine import TrainingError

    model = workflow.build_experiment_model("vit_b16_head", **{**TINY, "image_size": 64})
    with pytest.warns(UserWarning, match="Skipped"):
        splits = load_splits(synthetic_root, seed=SEED)
    with pytest.raises(TrainingError, match=r"does not fit vit_b16_head: image_size=64 \(the experiment has 32\)"):
        workflow.train_experiment("vit_b16_head", splits=splits, out=tmp_path,
                                  runtime=Runtime.create("cpu", progress=False), options=RunOptions(tensorboard=False),
                                  model=model, **TINY)


def test_cli_limit_keeps_that_many_images_per_class(synthetic_root, tmp_path):
    with pytest.warns(UserWarning, match="Skipped"), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "vit_b16_head", f"--data-dir={synthetic_root}", f"--out={tmp_path}", "--limit=2",
                     "--no-tensorboard", *TINY_FLAGS]) == 0
    dataset = json.loads((tmp_path / "vit_b16_head" / "metrics.json").read_text())["dataset"]
    assert dataset["limit_per_class"] == 2
    assert all(n == 2 for split in ("train", "test") for n in dataset["counts"][split].values())
    assert all(1 <= n <= 2 for n in dataset["counts"]["val"].values())  # carved: 1-2 of each class here


def test_fit_reports_its_phases_to_the_timer_it_is_given(synthetic_root, tmp_path):
    from cxr.train.engine import fit
    from cxr.common.timing import PhaseTimes

    with pytest.warns(UserWarning, match="Skipped"):
        splits = load_splits(synthetic_root)
    times = PhaseTimes()
    result = fit(get_experiment("resnet152_head", **{**TINY, "epochs": 2, "augment": False}), splits, tmp_path,
                 Runtime.create("cpu", progress=False), seed=SEED, phase_timer=times)
    counts = {name: len(seconds) for name, seconds in times.spent.items()}
    assert counts == {"model build": 1, "BatchNorm statistics": 1, "train": 2, "validate": 2, "checkpoint save": 2,
                      "checkpoint wait": 1}  # best.pt was kept in memory: no reload
    assert all(s > 0 for seconds in times.spent.values() for s in seconds)
    assert [round(row["seconds"], 6) >= round(t + v, 6) for row, t, v in
            zip(result.history, times.spent["train"], times.spent["validate"])] == [True, True]
