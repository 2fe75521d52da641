"""metrics.json as one typed record: one writer, one reader that upgrades the files earlier versions wrote."""

import json
import subprocess
from pathlib import Path

import pytest

from cxr.evaluate import metrics
from cxr.report import readme as report
from cxr.report.run_record import (SCHEMA_VERSION, DatasetInfo, EvaluationRecord, ExternalRecord, RunRecord, RunRecordError,
                            Timings, WeightsFile, as_record, read_run_record)
from cxr.report.run_record import TestScores as Scores  # imported as Test*, pytest would try to collect it

ROOT = Path(__file__).parents[1]
COMMITTED = sorted(subprocess.run(["git", "ls-files", "assets"], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.split())
COMMITTED = [p for p in COMMITTED if p.endswith("metrics.json")]
TRAINING_KEYS = ["schema_version", "experiment", "config", "weights", "weights_file", "epochs_run", "best_epoch",
                 "stopped_early", "seed", "deterministic", "dataset", "added_training", "audit", "shortcut_baseline",
                 "device", "mixed_precision", "pipeline", "torch", "python", "train_seconds", "wall_seconds",
                 "git_commit", "date", "best_val", "test", "shortcuts", "files", "figures_not_written"]


def test_the_repository_commits_runs_of_every_kind():
    kinds = {type(read_run_record(ROOT / p)) for p in COMMITTED}
    assert kinds == {RunRecord, EvaluationRecord, ExternalRecord}


@pytest.mark.parametrize("path", COMMITTED)
def test_every_committed_metrics_json_reads_and_keeps_its_values(path):
    """The committed runs (the H100 ones from version 1 among them) read as records; written again, every key
    and value they hold is kept, and what they lacked reads as absent."""
    raw = json.loads((ROOT / path).read_text())
    record = read_run_record(ROOT / path)
    assert record.source == ROOT / path and record.test.accuracy == raw["test"]["accuracy"]
    written = record.to_dict()
    assert written["schema_version"] == SCHEMA_VERSION
    for key, value in raw.items():
        expected = {"limit_per_class": None, **value} if key == "dataset" else value
        assert written[key] == expected, key
    assert all(written[key] is None for key in set(written) - set(raw) - {"schema_version"})


def old_run() -> dict:
    """A training run's metrics.json as version 1 wrote it (before schema_version, local weights, added folders,
    the shortcut checks and --limit), with a note added by hand."""
    return {"experiment": "resnet50_full", "config": {"name": "resnet50_full", "epochs": 12}, "weights": "imagenet",
            "epochs_run": 12, "best_epoch": 9, "stopped_early": False, "seed": 42, "deterministic": False,
            "dataset": {"name": "cxr", "root": "/data/cxr", "val_source": "carve",
                        "counts": {"train": {"NORMAL": 3}, "test": {"NORMAL": 2}}, "skipped_files": 0},
            "audit": {"warnings": []}, "device": "NVIDIA H100", "mixed_precision": "bf16", "pipeline": {"workers": 8},
            "torch": "2.5.1", "python": "3.12.1", "train_seconds": 301.5, "wall_seconds": 420.0,
            "git_commit": "314dc98095ad", "date": "2026-11-20T10:00:00+00:00", "best_val": {"val_macro_f1": 0.9},
            "test": {"accuracy": 0.9, "macro_f1": 0.88}, "files": {"metrics": "metrics.json"},
            "commit_note": "corrected by hand"}


def test_a_version_1_file_is_upgraded(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(old_run()))
    record = read_run_record(path)
    assert isinstance(record, RunRecord)
    assert record.dataset == DatasetInfo("cxr", "/data/cxr", "carve", {"train": {"NORMAL": 3}, "test": {"NORMAL": 2}},
                                         None, 0)
    assert record.timings == Timings(301.5, 420.0) and record.planned_epochs == 12
    assert record.weights_file is None and record.shortcuts is None and record.added_training is None
    assert record.test.macro_f1 == 0.88 and record.test.ci95 == {} and record.test.tta is None
    assert record.extra == {"commit_note": "corrected by hand"}
    record.write(path)
    upgraded = json.loads(path.read_text())
    assert upgraded["schema_version"] == SCHEMA_VERSION and upgraded["commit_note"] == "corrected by hand"
    assert upgraded["dataset"]["limit_per_class"] is None and read_run_record(path) == record


def test_a_file_from_a_newer_version_or_not_a_record_is_refused_naming_it(tmp_path):
    path = tmp_path / "metrics.json"
    for content, message in ((dict(old_run(), schema_version=SCHEMA_VERSION + 1), "written by a newer cxr"),
                             (dict(old_run(), schema_version="2"), "not a version number"),
                             ([1, 2], "not a JSON object"), (dict(old_run(), test="0.9"), "'test' is not a table"),
                             (dict(old_run(), dataset={"name": "x", "colour": "red"}), "colour")):
        path.write_text(json.dumps(content))
        with pytest.raises(RunRecordError, match=message) as caught:
            read_run_record(path)
        assert str(path) in str(caught.value)
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(RunRecordError, match="not UTF-8 text"):
        read_run_record(path)


def full_run() -> RunRecord:
    return RunRecord(
        experiment="mobilenet_v2_head", config={"name": "mobilenet_v2_head", "epochs": 3}, weights="/w/m.pt",
        weights_file=WeightsFile("m.pt", "ab" * 32), epochs_run=3, best_epoch=2, stopped_early=True, seed=7,
        deterministic=True, dataset=DatasetInfo("cxr", "/d", "given", {"test": {"NORMAL": 4}}, 10, 1),
        added_training={"folders": []}, audit={"warnings": ["w"]}, shortcut_baseline={"test": {"accuracy": 0.5}},
        device="cpu (2 cores)", mixed_precision="fp32", pipeline={"workers": 0}, torch="2.5", python="3.12",
        timings=Timings(1.5, 9.25), git_commit="abc", date="2026-12-03T10:00:00+00:00",
        best_val={"val_macro_f1": 0.7}, test=Scores({"accuracy": 0.75, "ci95": {"accuracy": [0.5, 0.9]},
                                                          "tta": {"accuracy": 0.8}}),
        shortcuts={"sentence": "s"}, files={"metrics": "metrics.json"}, figures_not_written=["cam.png"])


def test_write_then_read_gives_the_same_record(tmp_path):
    records = [full_run(),
               EvaluationRecord(experiment="e", evaluated_checkpoint="best.pt", checkpoint_epoch=2, config={"a": 1},
                                dataset=DatasetInfo(name="cxr"), wall_seconds=3.0, test=Scores({"accuracy": 1.0}),
                                shortcuts={"x": 1}, files={"roc": "roc.png"}),
               ExternalRecord(experiment="e", checkpoint="best.pt", external={"folder": "nih"}, overlaps={"count": 0},
                              test=Scores({"accuracy": 0.4}), test_without_overlaps=Scores({"accuracy": 0.3}))]
    for number, record in enumerate(records):
        path = record.write(tmp_path / f"{number}.json")
        assert read_run_record(path) == record and type(read_run_record(path)) is type(record)


def test_the_writer_keeps_the_keys_other_tools_read():
    """The record is typed in Python; the JSON stays flat with the keys it always had, plus schema_version."""
    written = full_run().to_dict()
    assert list(written) == TRAINING_KEYS
    assert written["train_seconds"] == 1.5 and written["weights_file"] == {"name": "m.pt", "sha256": "ab" * 32}
    assert written["test"]["tta"] == {"accuracy": 0.8} and written["dataset"]["limit_per_class"] == 10
    accuracy = next(m for m in metrics.METRICS if m.name == "accuracy")
    assert full_run().test.tta == Scores({"accuracy": 0.8}) and full_run().test.interval(accuracy) == [0.5, 0.9]


def test_the_dict_train_experiment_returns_reads_as_its_record():
    returned = {**full_run().to_dict(), "folder": "assets/mobilenet_v2_head"}
    assert as_record(returned) == full_run() and as_record(returned).source is None


@pytest.mark.parametrize("document, assets", [("README.md", "assets"), ("docs/cpu-full-budget.md", "assets/cpu-no-augment")])
def test_generated_blocks_match_the_committed_runs(document, assets):
    """README's blocks (and a doc's) are what ``cxr report`` renders from the committed runs of every version:
    rendering them again changes no byte."""
    path, folder = ROOT / document, ROOT / assets
    text = path.read_text()
    runs = report.collect_metrics(folder)
    baseline = report.shortcut_baseline(runs) or report.audit_baseline(folder, runs)
    rendered = report.replace_results(text, report.render_results(runs, path.parent, baseline))
    assert report.replace_shortcuts(rendered, report.render_shortcuts(runs, baseline)) == text
