"""`cxr report`: the README results section is generated from metrics.json files (fixtures written here)."""

import json
import shutil
from pathlib import Path

import pytest

from cxr.cli import main
from cxr.data.layout import CLASSES
from cxr.report.readme import END_MARKER, START_MARKER, ReportError, replace_results, write_report

README = f"# Project\n\nIntro.\n\n## Results\n\n{START_MARKER}\nold table\n{END_MARKER}\n\n## Later section\n\nKept.\n"
RECALLS = {"resnet152_head": [0.91, 0.62, 0.77, 0.95], "resnet50_full": [0.97, 0.86, 0.73, 0.99]}


def fake_metrics(name: str, accuracy: float, recalls: list[float], ci95: dict | None = None, **extra) -> dict:
    test = {
        "accuracy": accuracy,
        "macro_f1": accuracy - 0.0123,
        "balanced_accuracy": accuracy - 0.0061,
        "per_class": {c: {"precision": 0.5, "recall": r, "f1": 0.5, "support": 40} for c, r in zip(CLASSES, recalls)},
    }
    if ci95 is not None:
        test["ci95"] = ci95
    return {
        "experiment": name,
        "config": {"epochs": 20},
        "weights": "none",
        "epochs_run": 12,
        "best_epoch": 9,
        "stopped_early": True,
        "dataset": {"name": "cxr-sample", "val_source": "carve",
                    "counts": {"train": {c: 300 for c in CLASSES}, "val": {c: 33 for c in CLASSES},
                               "test": {c: 40 for c in CLASSES}}},
        "device": "NVIDIA H100 80GB HBM3",
        "mixed_precision": "bfloat16",
        "train_seconds": 754.0,
        "git_commit": "abc123def456",
        "date": "2026-11-25T19:34:00+00:00",
        "test": test,
        "files": {"curves": "curves.png", "confusion_matrix": "confusion_matrix.png", "predictions": "predictions.png",
                  "metrics": "metrics.json"},
        **extra,
    }


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A README with markers, one run with bootstrap intervals (and all figures), one without (one figure)."""
    (tmp_path / "README.md").write_text(README)
    ci95 = {"accuracy": [0.8123, 0.8899], "macro_f1": [0.8, 0.87], "balanced_accuracy": [0.81, 0.88],
            "recall": {c: [r - 0.05, min(1.0, r + 0.03)] for c, r in zip(CLASSES, RECALLS["resnet50_full"])}}
    runs = {"resnet50_full": fake_metrics("resnet50_full", 0.8532, RECALLS["resnet50_full"], ci95),
            "resnet152_head": fake_metrics("resnet152_head", 0.4811, RECALLS["resnet152_head"])}
    for name, metrics in runs.items():
        run_dir = tmp_path / "assets" / name
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    for figure in ("curves.png", "confusion_matrix.png", "predictions.png", "reliability.png"):
        (tmp_path / "assets" / "resnet50_full" / figure).write_bytes(b"png")
    (tmp_path / "assets" / "resnet152_head" / "curves.png").write_bytes(b"png")
    return tmp_path


def section(text: str) -> str:
    return text[text.index(START_MARKER): text.index(END_MARKER) + len(END_MARKER)]


def row(text: str, name: str, table: int) -> list[str]:
    """The cells of ``name``'s row in the ``table``-th table of the results section."""
    rows = [line for line in section(text).splitlines() if line.startswith(f"| `{name}`")]
    return [cell.strip() for cell in rows[table].strip("|").split("|")]


def test_report_writes_tables_between_markers(project):
    listed = write_report(project / "assets", project / "README.md").written
    text = (project / "README.md").read_text()

    assert listed == ["resnet152_head", "resnet50_full"]  # configured order, not alphabetical
    assert text.startswith("# Project\n\nIntro.\n\n## Results\n\n") and text.endswith("## Later section\n\nKept.\n")
    assert "old table" not in text
    assert section(text).index("`resnet152_head`") < section(text).index("`resnet50_full`")

    with_ci = row(text, "resnet50_full", 0)
    assert with_ci[1:4] == ["0.853", "0.841 (0.800-0.870)", "0.847"]  # macro-F1's interval alone: a front page
    assert with_ci[4:] == [f"{r:.3f}" for r in RECALLS["resnet50_full"]]

    without_ci = row(text, "resnet152_head", 0)
    assert without_ci[1:] == ["0.481", "0.469", "0.475", *(f"{r:.3f}" for r in RECALLS["resnet152_head"])]


def test_report_run_details_links_and_provenance(project):
    write_report(project / "assets", project / "README.md")
    text = (project / "README.md").read_text()

    details = row(text, "resnet50_full", 1)
    assert details[1:6] == ["12/20, best 9, stopped early", "12.6 min", "NVIDIA H100 80GB HBM3, bfloat16", "none",
                            "cxr-sample (1200/132/160)"]
    assert details[6] == "[4 figures](assets/resnet50_full/)"  # the figures on disk, counted
    assert row(text, "resnet152_head", 1)[6] == "[1 figure](assets/resnet152_head/)"

    provenance = next(line for line in section(text).splitlines() if line.startswith("Provenance"))
    for fact in ("cxr-sample (1200 train, 132 val carved from train, 160 test images)", "weights none",
                 "NVIDIA H100 80GB HBM3, bfloat16", "date 2026-11-25", "commit abc123def456", "macro-F1's bootstrap 95% confidence interval"):
        assert fact in provenance


def test_report_is_stable_and_links_relative_to_readme(project):
    (project / ".git").mkdir()  # the repository's root: a README in docs/ may link to ../assets
    docs = project / "docs"
    docs.mkdir()
    (docs / "RESULTS.md").write_text(README)
    write_report(project / "assets", docs / "RESULTS.md")
    first = (docs / "RESULTS.md").read_text()
    write_report(project / "assets", docs / "RESULTS.md")
    assert (docs / "RESULTS.md").read_text() == first
    assert "[1 figure](../assets/resnet152_head/)" in first


def test_report_errors_are_clear(project, tmp_path):
    (project / "README.md").write_text("# no markers\n")
    with pytest.raises(ReportError, match="results:start"):
        write_report(project / "assets", project / "README.md")
    with pytest.raises(ReportError, match="No metrics.json"):
        write_report(tmp_path / "empty", project / "README.md")
    (project / "assets" / "resnet50_full" / "metrics.json").write_text("{not json")
    with pytest.raises(ReportError, match="resnet50_full"):
        write_report(project / "assets", project / "README.md")


def test_report_cli(project, capsys):
    assert main(["report", "--assets", str(project / "assets"), "--readme", str(project / "README.md")]) == 0
    assert "resnet152_head, resnet50_full" in capsys.readouterr().out
    assert main(["report", "--assets", str(project / "nowhere"), "--readme", str(project / "README.md")]) == 1
    assert capsys.readouterr().err.startswith("error: No metrics.json")


def test_repository_readme_has_results_markers():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert replace_results(readme, "BLOCK").count("BLOCK") == 1


def test_durations_read_naturally():
    from cxr.report.readme import format_duration

    assert [format_duration(s) for s in (0.29, 42, 754.0, 7200)] == ["0.3 s", "42 s", "12.6 min", "2.0 h"]
    assert format_duration(None) == "n/a"


def _with_checks(project: Path, name: str, baseline_f1: float, views: dict, saliency: dict | None) -> None:
    path = project / "assets" / name / "metrics.json"
    metrics = json.loads(path.read_text())
    ci95 = {"accuracy": [0.75, 0.85], "macro_f1": [baseline_f1 - 0.04, baseline_f1 + 0.04], "balanced_accuracy": [0.7, 0.8],
            "recall": {c: [0.6, 0.9] for c in CLASSES}}
    metrics["shortcut_baseline"] = {
        "features": ["aspect_ratio", "border_mean"], "test_images": 160,
        "test": {"accuracy": 0.8, "macro_f1": baseline_f1, "balanced_accuracy": 0.79, "ci95": ci95,
                 "per_class": {c: {"recall": 0.75} for c in CLASSES}}}
    metrics["shortcuts"] = {
        "views": {view: {"macro_f1": f1, "ci95": {"macro_f1": [f1 - 0.05, f1 + 0.05]}} for view, f1 in views.items()},
        "sentence": f"With the lungs hidden, macro-F1 falls from {views['as_is']:.2f} to {views['lungs_hidden']:.2f}.",
        "saliency": saliency, "saliency_sentence": None}
    path.write_text(json.dumps(metrics))


def test_report_adds_the_baseline_row_and_what_the_models_learn(project):
    from cxr.report.readme import BASELINE_ROW, SHORTCUTS_END, SHORTCUTS_START

    readme = project / "README.md"
    readme.write_text(readme.read_text() + f"\n## What the models learn\n\n{SHORTCUTS_START}\nold\n{SHORTCUTS_END}\n")
    _with_checks(project, "resnet50_full", 0.86, {"as_is": 0.841, "lungs_hidden": 0.612, "lungs_only": 0.70},
                 {"lung_share": 0.41, "lung_area_share": 0.28, "randomisation": {"spearman_mean": 0.123}})
    write_report(project / "assets", readme)
    text = readme.read_text()

    baseline = next(line for line in section(text).splitlines() if line.startswith(f"| {BASELINE_ROW}"))
    assert "| 0.800 | 0.860 (0.820-0.900) |" in baseline
    learned = text[text.index(SHORTCUTS_START): text.index(SHORTCUTS_END)]
    assert "old" not in learned and "reaches test macro-F1 0.860 (0.820-0.900)" in learned
    assert ("| `resnet50_full` | 0.84 (0.79-0.89) | 0.61 (0.56-0.66) | n/a | 0.70 (0.65-0.75) | n/a | n/a | n/a | n/a "
            "| 41% (28%) |" in learned)  # masked scores from before the equal-area control: no control, no probes
    assert ("- `resnet50_full`: It does no better than the shortcut baseline, which never sees the lungs "
            "(macro-F1 0.84 against 0.86). Its masked scores predate the equal-area control and the probes, so they "
            "say nothing about the lungs; re-evaluate it (`cxr evaluate`).") in learned
    assert "falls from" not in learned  # the old reading of the drop is not repeated
    assert ("- `resnet152_head`: It does no better than the shortcut baseline, which never sees the lungs (macro-F1 "
            "0.47 against 0.86).\n") in learned
    assert ("- No masked, probe or saliency checks in the metrics.json of `resnet152_head` (written before the checks "
            "existed): re-run them.") in learned
    assert "| `resnet152_head` |" not in learned and "| `resnet50_full` |" in learned  # a row only with checks


def _view(f1: float) -> dict:
    return {"macro_f1": f1, "ci95": {"macro_f1": [f1 - 0.05, f1 + 0.05]}}


def test_report_renders_controls_probes_pairs_groups_and_external_shares(project):
    from cxr.report.readme import SHORTCUTS_END, SHORTCUTS_START

    readme = project / "README.md"
    readme.write_text(readme.read_text() + f"\n{SHORTCUTS_START}\n{SHORTCUTS_END}\n")
    run_dir = project / "assets" / "resnet50_full"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    controls = {f"{p}_{m}": _view(0.8 if m == "hidden" else 0.3) for p in ("top", "bottom", "sides")
                for m in ("hidden", "only")}
    metrics["shortcuts"] = {"views": {"as_is": _view(0.9), "lungs_hidden": _view(0.5), "lungs_only": _view(0.7)},
                            "controls": {"views": controls}, "probes": {"lungs_hidden": _view(0.88),
                                                                         "lungs_only": _view(0.6)},
                            "sentence": "Hiding the lung field costs 0.40 macro-F1.", "short": "Short verdict.",
                            "saliency": None}
    metrics["test"]["pairwise_auroc"] = {"NORMAL vs PNEUMONIA": {"auroc": 0.93, "ci95": [0.9, 0.96], "images": 80,
                                                                 "same_source": True}}
    metrics["test"]["groups"] = {"sentence": "By source_repo, accuracy ranges from 0.50 (a) to 0.99 (b)."}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    external = {"external": {"folder": "nih-adult"}, "overlaps": {"audited": False},
                "test": {"images": 300, "accuracy": 0.1, "class_shares": {
                    "absent": ["COVID19", "TUBERCULOSIS"],
                    "shares": {"NORMAL": {"images": 150, "predicted": {"COVID19": 0.2, "NORMAL": 0.2, "PNEUMONIA": 0.0,
                                                                      "TUBERCULOSIS": 0.6}},
                               "PNEUMONIA": {"images": 150, "predicted": {"COVID19": 1.0, "NORMAL": 0.0,
                                                                         "PNEUMONIA": 0.0, "TUBERCULOSIS": 0.0}}}},
                         "pairwise_auroc": {"NORMAL vs PNEUMONIA": {"auroc": 0.62, "ci95": [0.55, 0.68], "images": 300,
                                                                    "same_source": True}}},
                "shortcut_baseline": {"test": {"accuracy": 0.02}}}
    (run_dir / "external" / "nih-adult").mkdir(parents=True)
    (run_dir / "external" / "nih-adult" / "metrics.json").write_text(json.dumps(external))
    write_report(project / "assets", readme)
    learned = readme.read_text()[readme.read_text().index(SHORTCUTS_START):]
    assert ("| `resnet50_full` | 0.90 (0.85-0.95) | 0.50 (0.45-0.55) | 0.80 | 0.70 (0.65-0.75) | 0.30 | "
            "0.88 (0.83-0.93) | 0.60 (0.55-0.65) | 0.93 (0.90-0.96) | n/a (n/a) |") in learned
    assert "Short verdict." in learned and "Hiding the lung field costs" not in learned  # the long one: model card
    assert "NORMAL vs PNEUMONIA (one source) AUROC 0.93 (0.90-0.96)." in learned
    assert "By source_repo, accuracy ranges from 0.50 (a) to 0.99 (b)." in learned
    assert ("On external `nih-adult` (300 images) accuracy 0.10 (no-anatomy baseline 0.02); 90% of its images called "
            "an absent class (NORMAL 60% TUBERCULOSIS, PNEUMONIA 100% COVID19); NORMAL vs PNEUMONIA (one source) AUROC "
            "0.62 (0.55-0.68); overlap with training not audited.") in learned


def test_baseline_verdict_reads_both_intervals():
    from cxr.report.readme import baseline_verdict

    baseline = {"test": {"macro_f1": 0.70, "ci95": {"macro_f1": [0.64, 0.76]}}}
    assert baseline_verdict({"macro_f1": 0.69}, baseline).startswith("It does no better than the shortcut baseline")
    assert "intervals overlap" in baseline_verdict({"macro_f1": 0.74, "ci95": {"macro_f1": [0.70, 0.79]}}, baseline)
    assert baseline_verdict({"macro_f1": 0.90, "ci95": {"macro_f1": [0.86, 0.93]}}, baseline).startswith(
        "It beats the shortcut baseline (macro-F1 0.90 against 0.70")
    assert baseline_verdict({"macro_f1": 0.9}, None) is None


def test_report_refuses_results_outside_the_repository(project, tmp_path_factory):
    """Links from README to another folder would leave the repository: refused, README untouched."""
    (project / ".git").mkdir()
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    for run in (project / "assets").iterdir():
        (elsewhere / run.name).mkdir()
        (elsewhere / run.name / "metrics.json").write_text((run / "metrics.json").read_text())
    before = (project / "README.md").read_text()
    with pytest.raises(ReportError, match="outside"):
        write_report(elsewhere, project / "README.md")
    assert (project / "README.md").read_text() == before


def test_report_says_which_rows_it_replaced(project, capsys):
    readme = str(project / "README.md")
    assert main(["report", "--assets", str(project / "assets"), "--readme", readme]) == 0
    assert "replaced" not in capsys.readouterr().out  # the first table named no run
    shutil.rmtree(project / "assets" / "resnet152_head")
    assert main(["report", "--assets", str(project / "assets"), "--readme", readme]) == 0
    out = capsys.readouterr().out
    assert "replaced the rows of resnet50_full" in out
    assert "removed the rows of resnet152_head" in out


def test_auroc_columns_and_external_rows_marked_as_such(project):
    run_dir = project / "assets" / "resnet50_full"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["test"]["roc_auc_ovr"] = 0.9012
    for number, name in enumerate(CLASSES):
        metrics["test"]["per_class"][name]["auroc"] = 0.8 + number / 100
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    external = {"external": {"folder": "elsewhere"}, "test": {**metrics["test"], "roc_auc_ovr": None, "ci95": {}},
                "test_without_overlaps": {**metrics["test"], "accuracy": 0.5}}
    (run_dir / "external" / "elsewhere").mkdir(parents=True)
    (run_dir / "external" / "elsewhere" / "metrics.json").write_text(json.dumps(external))
    write_report(project / "assets", project / "README.md")
    text = (project / "README.md").read_text()
    first = next(line for line in section(text).splitlines() if line.startswith("| experiment |"))
    header = [cell.strip() for cell in first.strip("|").split("|")]
    assert header[4] == "macro AUROC" and header[-4:] == [f"recall {c}" for c in CLASSES]
    assert not any(cell.startswith("AUROC ") for cell in header)  # per class: in the model card, not README
    assert row(text, "resnet50_full", 0)[4] == "0.901" and row(text, "resnet152_head", 0)[4] == "n/a"
    external_rows = [line for line in section(text).splitlines() if "**external** `elsewhere`" in line]
    assert len(external_rows) == 2 and "training overlaps removed" in external_rows[1]
    assert "| n/a |" in external_rows[0] and "| 0.500 | 0.841 (0.800-0.870) |" in external_rows[1]


def test_runs_older_than_the_baseline_take_it_from_the_audit_of_their_dataset(project):
    """An audit.json beside the runs (``cxr audit --out assets``) of the same dataset gives the baseline row,
    marked as the audit's; one of another dataset, or of other test counts, gives none."""
    from cxr.report.readme import BASELINE_ROW

    baseline = {"features": ["aspect_ratio"], "test_images": 160,
                "test": {"accuracy": 0.84, "macro_f1": 0.83, "per_class": {c: {"recall": 0.8} for c in CLASSES}}}
    audit = {"root": "/data/cxr-sample", "splits": {"test": {"counts": {c: 40 for c in CLASSES}}},
             "shortcut_baseline": baseline}
    readme, audit_path = project / "README.md", project / "assets" / "audit.json"
    audit_path.write_text(json.dumps(audit))
    write_report(project / "assets", readme)
    rows = [line for line in section(readme.read_text()).splitlines() if line.startswith(f"| {BASELINE_ROW}")]
    assert len(rows) == 1 and "from `cxr audit`" in rows[0] and "| 0.840 | 0.830 |" in rows[0]
    for other in ({**audit, "root": "/data/elsewhere"},
                  {**audit, "splits": {"test": {"counts": {c: 41 for c in CLASSES}}}}):
        audit_path.write_text(json.dumps(other))
        write_report(project / "assets", readme)
        assert BASELINE_ROW not in section(readme.read_text())


@pytest.mark.parametrize("change, message", [
    (lambda m: m["test"].update(ci95="0.80-0.89"), "has a 'ci95' that is not a table of [low, high] intervals"),
    (lambda m: m["test"].update(accuracy=float("nan")), "holds NaN or infinity where a score is shown"),
    (lambda m: m["test"].update(macro_f1="0.9"), "has a field of the wrong type (ValueError"),
    (lambda m: m.update(experiment="x " + END_MARKER), "names its experiment 'x <!-- results:end -->', which is not"),
    (lambda m: m.update(weights=START_MARKER), "holds text with an HTML comment marker ('<!-- results:start -->')"),
    (lambda m: m.update(schema_version=99), "was written by a newer cxr (schema_version 99"),
    (None, "not UTF-8 text"),
])
def test_a_damaged_metrics_json_is_named_and_readme_untouched(project, capsys, change, message):
    """A string ci95, NaN, random bytes or a results marker in a name used to give a traceback or a README
    whose markers no longer pair up; each is now one line naming the file, README unchanged."""
    path = project / "assets" / "resnet50_full" / "metrics.json"
    if change is None:
        path.write_bytes(bytes(range(256)) * 4)
    else:
        metrics = json.loads(path.read_text())
        change(metrics)
        path.write_text(json.dumps(metrics))
    before = (project / "README.md").read_text()
    assert main(["report", "--assets", str(project / "assets"), "--readme", str(project / "README.md")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: ") and str(path) in err and message in err and "README is unchanged" in err
    assert (project / "README.md").read_text() == before
