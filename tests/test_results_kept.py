"""Committed results are never replaced by surprise: a run says what it is about to replace."""

from __future__ import annotations

import json

import pytest

from cxr.cli import _resume_command, main
from cxr.report.compare import run_labels
from cxr.config import get_experiment
from cxr.report.readme import END_MARKER, START_MARKER, write_report
from cxr.workflow import results_replaced, run_folder


def test_a_run_names_the_results_it_replaces(tmp_path):
    experiment = get_experiment("vit_b16_head", epochs=1, weights="none")
    folder = tmp_path / "vit_b16_head"
    assert results_replaced(folder, experiment, "cpu") is None  # nothing there yet
    folder.mkdir()
    full_budget = {"config": get_experiment("vit_b16_head", weights="none").to_dict(), "device": "NVIDIA H100 80GB HBM3",
                   "epochs_run": 13, "weights": "none", "date": "2026-11-25T10:00:00+00:00"}
    (folder / "metrics.json").write_text(json.dumps(full_budget))
    message = results_replaced(folder, experiment, "cpu")
    assert "NVIDIA H100 80GB HBM3, 13 of 20 epochs, weights none, 2026-11-25" in message
    assert "another configuration or device" in message and "--out DIR" in message
    (folder / "metrics.json").write_text(json.dumps({**full_budget, "config": experiment.to_dict(), "device": "cpu"}))
    assert "the same configuration and device" in results_replaced(folder, experiment, "cpu")
    (folder / "metrics.json").write_text("{broken")
    assert "unreadable metrics.json" in results_replaced(folder, experiment, "cpu")


def test_a_run_goes_to_a_new_folder_beside_results_of_another_configuration(tmp_path):
    experiment = get_experiment("resnet50_full", epochs=2, image_size=64, weights="none")
    folder = tmp_path / "resnet50_full"
    assert run_folder(tmp_path, experiment, "cpu") == (folder, None)  # nothing there: the usual folder
    folder.mkdir()
    gpu_run = {"config": get_experiment("resnet50_full").to_dict(), "device": "NVIDIA H100 80GB HBM3", "epochs_run": 30}
    (folder / "metrics.json").write_text(json.dumps(gpu_run))
    moved, message = run_folder(tmp_path, experiment, "cpu")
    assert moved.parent.parent == tmp_path / "runs" and moved.name == "resnet50_full"
    assert f"they are kept and this run writes into {moved}/" in message and "H100" in message
    assert run_folder(tmp_path, experiment, "cpu", overwrite=True)[0] == folder  # asked for: replaced, with a warning
    assert "this run replaces them" in run_folder(tmp_path, experiment, "cpu", overwrite=True)[1]
    assert run_folder(tmp_path, experiment, "cpu", resume=True) == (folder, None)
    (folder / "metrics.json").write_text(json.dumps({**gpu_run, "config": experiment.to_dict(), "device": "cpu"}))
    same, message = run_folder(tmp_path, experiment, "cpu")  # a rerun of the same recipe on the same device
    assert same == folder and "the same configuration and device" in message


def test_the_resume_command_names_the_folder_the_run_went_to():
    argv = ["train", "resnet50_full", "--out", "assets", "--epochs", "2"]
    assert _resume_command(argv, "assets/runs/20261203T070000Z") == (
        "cxr train resnet50_full --epochs 2 --out assets/runs/20261203T070000Z --resume")
    assert _resume_command(["train", "resnet50_full", "--out=assets"], "x") == "cxr train resnet50_full --out x --resume"


def test_evaluate_writes_its_own_record_and_never_touches_the_run(checkpoint, synthetic_root, tmp_path, capsys):
    run = tmp_path / "repo" / "assets" / "resnet50_full"
    run.mkdir(parents=True)
    committed = {"experiment": "resnet50_full", "epochs_run": 30, "best_epoch": 17, "device": "NVIDIA H100",
                 "test": {"accuracy": 0.9, "macro_f1": 0.825, "per_class": {}}}
    for name, text in (("metrics.json", json.dumps(committed)), ("classification_report.json", "{}"),
                       ("model_card.md", "H100 card"), ("test_logits.npz", "committed")):
        (run / name).write_text(text)
    before = {path.name: path.read_bytes() for path in run.iterdir()}
    with pytest.warns(UserWarning, match="Skipped"):
        assert main(["evaluate", "--checkpoint", checkpoint, "--data-dir", str(synthetic_root), "--out",
                     str(run.parent), "--device", "cpu", "--tta", "--quiet"]) == 0
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    (folder,) = (run / "evaluations").iterdir()
    assert folder.name.endswith("-best")
    record = json.loads((folder / "metrics.json").read_text())
    assert record["kind"] == "evaluation" and record["evaluated_checkpoint"] == checkpoint
    assert record["checkpoint_epoch"] == 1 and "epochs_run" not in record and "best_epoch" not in record
    assert set(record["test"]["tta"]) >= {"accuracy", "macro_f1", "ci95", "views"} and record["shortcuts"]["views"]
    assert (folder / "test_logits.npz").is_file() and (folder / "confusion_matrix.png").is_file()
    card = (folder / "model_card.md").read_text()
    assert f"`{checkpoint}`" in card and "H100" not in card and "best_epoch" not in card
    printed = capsys.readouterr().out
    tta = record["test"]["tta"]
    assert f"with test-time augmentation ({tta['views']}):" in printed
    assert f"macro-F1 {tta['macro_f1']:.3f}" in printed and f"files in {folder}/" in printed
    readme = tmp_path / "repo" / "README.md"
    readme.write_text(f"{START_MARKER}\n{END_MARKER}\n")
    write_report(run.parent, readme)
    rows = readme.read_text()
    assert f"| `resnet50_full` **evaluated** `{folder.name}` | {record['test']['accuracy']:.3f}" in rows
    assert f"| `resnet50_full` **evaluated** `{folder.name}`, test-time augmentation | {tta['accuracy']:.3f}" in rows


def test_compare_tells_two_runs_of_one_experiment_apart(tmp_path):
    paths = [tmp_path / "assets" / "resnet50_full" / "metrics.json", tmp_path / "cpu" / "resnet50_full" / "metrics.json"]
    runs = [{"experiment": "resnet50_full"}] * 2
    assert run_labels(runs, paths) == ["resnet50_full (assets/resnet50_full)", "resnet50_full (cpu/resnet50_full)"]
    assert run_labels([{"experiment": "a"}, {"experiment": "b"}], paths) == ["a", "b"]
