"""README results, generated from the runs' ``metrics.json`` files so no number is ever typed by hand.

``cxr report`` reads every ``assets/<experiment>/metrics.json`` and rewrites the part of README.md
between the markers below: a table of test-split scores (with the shortcut baseline as a row), a table
of how each run was made (with links to its figures) and a provenance line naming the dataset, weights,
device, date and commit. Where README also holds the ``shortcuts`` markers, the section between them
("What the models learn") is rewritten too: each run's masked scores against the equal-area control, its
train-on-view probes, the same-source pair's AUROC (NORMAL vs PNEUMONIA), saliency, subgroup and external
results, and its conclusion; runs from before a check existed show n/a or say what to re-run.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from cxr.evaluate import metrics
from cxr.data.added_folders import added_sentence
from cxr.evaluate.breakdowns import SAME_SOURCE_PAIRS, pair_name, shares_short
from cxr.config import EXPERIMENTS
from cxr.data.layout import CLASSES
from cxr.report.run_record import (AnyRecord, ExternalRecord, RunRecord, RunRecordError, TestScores, Timings, as_record,
                         record_from_dict)

START_MARKER = "<!-- results:start -->"
END_MARKER = "<!-- results:end -->"
SHORTCUTS_START = "<!-- shortcuts:start -->"
SHORTCUTS_END = "<!-- shortcuts:end -->"
BASELINE_ROW = "shortcut baseline (no anatomy)"
PLAIN_NAME = re.compile(r"[\w.+-]+")
NOT_A_NUMBER = re.compile(r"(?<![\w.])-?(nan|inf)(?![\w])", re.IGNORECASE)


class ReportError(RuntimeError):
    """The results cannot be gathered or written; the message says what to do."""


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file the report reads; random bytes or damaged JSON are a ReportError naming the file."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else str(error)
        raise ReportError(f"Could not read {str(path)!r} ({reason}); re-run the experiment to rewrite it. "
                          "README is unchanged.") from None


def read_record(path: str | os.PathLike, data: Any = None) -> AnyRecord:
    """A metrics.json the report reads (``data``: its JSON, when already read), upgraded from the version that
    wrote it (:func:`cxr.report.run_record.record_from_dict`); a file that is not one is a ReportError naming it."""
    path = Path(path)
    data = read_json(path) if data is None else data
    try:
        return record_from_dict(data, path)
    except (RunRecordError, TypeError) as error:
        raise ReportError(f"{str(path)!r} {error}; fix or re-run that experiment. README is unchanged.") from None


def read_metrics(path: str | os.PathLike) -> AnyRecord:
    """One run's record (its ``source``: the path it came from), checked as the report reads it."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("test"), dict):
        raise ReportError(f"{str(path)!r} has no 'test' scores; is it a metrics.json written by cxr train?")
    record = read_record(path, data)
    check_run(record, path)
    return record


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def check_run(record: AnyRecord, path: Path) -> None:
    """Refuse, naming the file, what would put a wrong README on the page: an experiment name that is not a
    plain name, text holding an HTML comment (a results marker would cut the block short), a ``ci95`` that
    is not a table of intervals, a field of the wrong type, or NaN or infinity where a score is shown."""
    def refuse(why: str) -> ReportError:
        return ReportError(f"{str(path)!r} {why}; fix or re-run that experiment. README is unchanged.")

    name = record.label
    if not PLAIN_NAME.fullmatch(name):
        raise refuse(f"names its experiment {name!r}, which is not a plain name (letters, digits, '.', '_', '+', '-')")
    marked = next((text for text in _strings(record.to_dict()) if "<!--" in text or "-->" in text), None)
    if marked is not None:
        raise refuse(f"holds text with an HTML comment marker ({marked[:80]!r}), which would break README's markers")
    tests = [record.test, *(test for _, test in external_rows(record))]
    if any(not isinstance(test, Mapping) or not isinstance(test.ci95, dict) for test in tests):
        raise refuse("has a 'ci95' that is not a table of [low, high] intervals")
    try:
        rendered = render_results([record], path.parent) + render_shortcuts([record])
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as error:
        raise refuse(f"has a field of the wrong type ({type(error).__name__}: {error})") from None
    if NOT_A_NUMBER.search(rendered):
        raise refuse("holds NaN or infinity where a score is shown")


def collect_metrics(assets: str | os.PathLike = "assets") -> list[AnyRecord]:
    """Every ``assets/*/metrics.json``, in the order of the configured experiments (others after, by name)."""
    assets = Path(assets)
    paths = sorted(assets.glob("*/metrics.json"))
    if not paths:
        raise ReportError(
            f"No metrics.json found under {str(assets)!r}/*/; train an experiment first "
            "(e.g. `cxr train resnet152_head`) or pass --assets DIR."
        )
    order = {name: index for index, name in enumerate(EXPERIMENTS)}
    runs = [read_metrics(path) for path in paths]
    return sorted(runs, key=lambda m: (order.get(str(m.experiment), len(order)), _name(m)))


def _name(record: AnyRecord) -> str:
    """The run's label: its experiment, and the folders it added to training (two runs of one experiment, with
    and without them, are told apart)."""
    added_training = _training(record).added_training or {}
    added = [f["folder"] for f in added_training.get("folders", []) if any(f["added"].values())]
    return " + ".join([record.label, *added])


def _training(record: AnyRecord) -> RunRecord:
    """What only a training run records (its epochs, time, added folders, baseline), empty for an evaluation."""
    return record if isinstance(record, RunRecord) else RunRecord()


def interval(ci95: dict[str, Any], *keys: str) -> Sequence[float] | None:
    """The [low, high] interval at ``ci95[keys[0]][keys[1]]...``, or None when it is absent."""
    value: Any = ci95
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, (list, tuple)) and len(value) == 2 else None


def recall_interval(ci95: dict[str, Any], name: str) -> Sequence[float] | None:
    """A class's recall interval, stored as ``ci95["recall"][name]`` (see ``metrics.bootstrap_ci``)."""
    return interval(ci95, "recall", name)


def format_score(value: float | None, interval: Sequence[float] | None = None, digits: int = 3) -> str:
    """``0.853`` or, with a bootstrap interval, ``0.853 (0.828-0.877)``; ``n/a`` for a missing value."""
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    if interval is not None:
        text += f" ({interval[0]:.{digits}f}-{interval[1]:.{digits}f})"
    return text


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 10:
        return f"{seconds:.1f} s"  # a head trained on cached features takes well under a second
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def split_sizes(record: AnyRecord) -> dict[str, int]:
    """Images per split, summed over classes."""
    dataset = getattr(record, "dataset", None)
    return dataset.sizes() if dataset else {}


def _dataset_name(record: AnyRecord) -> str:
    dataset = getattr(record, "dataset", None)
    return "unknown" if dataset is None or dataset.name is None else str(dataset.name)


def _dataset_text(record: AnyRecord) -> str:
    sizes = split_sizes(record)
    counts = "/".join(str(sizes[s]) for s in ("train", "val", "test") if s in sizes)
    text = f"{_dataset_name(record)} ({counts})" if counts else _dataset_name(record)
    added = added_sentence(_training(record).added_training)
    return f"{text}; {added}" if added else text


def _device_text(record: AnyRecord) -> str:
    precision = _training(record).mixed_precision
    device = getattr(record, "device", None)
    device = "unknown" if device is None else str(device)
    return f"{device}, {precision}" if precision else device


def _epochs_text(record: AnyRecord) -> str:
    planned = getattr(record, "config", {}).get("epochs")
    run = _training(record)
    text = f"{'?' if run.epochs_run is None else run.epochs_run}" + (f"/{planned}" if planned else "")
    if run.best_epoch:
        text += f", best {run.best_epoch}"
    return text + (", stopped early" if run.stopped_early else "")


def _link(target: Path, base: Path) -> str:
    return Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()


def figure_links(record: AnyRecord, base: Path) -> str:
    """A Markdown link, relative to ``base``, to the run's folder, counting the PNG figures there (one link, not
    one per figure: the table must fit a front page; the folder shows them all)."""
    run_dir = record.source.parent
    count = len([path for path in run_dir.glob("*.png") if path.is_file()])
    if not count:
        return "none"
    return f"[{count} figure{'s' if count > 1 else ''}]({_link(run_dir, base)}/)"


def _scores(test: TestScores | Mapping[str, Any]) -> TestScores:
    return test if isinstance(test, TestScores) else TestScores(dict(test))


# README's results table gives this score's interval alone: the one runs are chosen and compared by.
INTERVAL_SHOWN = "macro_f1"


def reported(tests: Sequence[TestScores]) -> list[metrics.Metric]:
    """The table's README metrics that at least one test section holds (files from before a metric existed
    lack it), so adding a metric changes no README until a run measures it."""
    def holds(test: TestScores, metric: metrics.Metric) -> bool:
        if metric.per_class:
            return any(metric.name in scores for scores in test.per_class.values())
        return metric.name in test

    return [m for m in metrics.METRICS if m.readme and any(holds(test, m) for test in tests)]


def score_cells(test: TestScores, shown: Sequence[metrics.Metric]) -> list[str]:
    """One table row's scores: each shown metric, per class for per-class ones; the interval of the
    headline score only (:data:`INTERVAL_SHOWN`), so that the table fits a front page."""
    cells = [format_score(test.value(m), test.interval(m) if m.name == INTERVAL_SHOWN else None)
             for m in shown if not m.per_class]
    cells += [format_score(test.value(m, c)) for m in shown if m.per_class for c in CLASSES]
    return cells


def scores_table(runs: Sequence[AnyRecord | Mapping[str, Any]], baseline: dict[str, Any] | None = None) -> str:
    """Test-split scores per experiment, with 95% bootstrap intervals where metrics.json has them; a run's
    external evaluations (``external/<folder>/metrics.json`` beside its metrics.json) follow it, marked; the
    shortcut baseline's (file and border statistics only; ``baseline``, else a run's) is the last row."""
    runs = [as_record(m) for m in runs]
    labelled = [(f"`{_name(m)}`", m.test) for m in runs]
    labelled = [row for run, own in zip(runs, labelled) for row in
                [own, *((f"`{_name(run)}` {label}", test) for label, test in external_rows(run) + evaluation_rows(run))]]
    baseline = baseline or shortcut_baseline(runs)
    if baseline is not None:
        labelled.append((BASELINE_ROW + baseline.get("_from", ""), _scores(baseline["test"])))
    shown = reported([test for _, test in labelled])
    header = ["experiment", *(m.label for m in shown if not m.per_class),
              *(f"{m.label} {c}" for m in shown if m.per_class for c in CLASSES)]
    return _markdown_table(header, [[label, *score_cells(test, shown)] for label, test in labelled])


def external_results(record: AnyRecord) -> list[ExternalRecord]:
    """The run's external evaluations: ``external/<folder>/metrics.json`` beside its metrics.json, by folder."""
    folder = record.source.parent / "external"
    results = [read_record(path) for path in sorted(folder.glob("*/metrics.json"))]
    wrong = next((r.source for r in results if not isinstance(r, ExternalRecord)), None)
    if wrong is not None:
        raise ReportError(f"{str(wrong)!r} is not an external evaluation's metrics.json; README is unchanged.")
    return results


def external_rows(record: AnyRecord) -> list[tuple[str, TestScores]]:
    """(label, test section) per external evaluation, and again without the images that overlap training."""
    rows = []
    for result in external_results(record):
        rows.append((f"**external** `{result.folder}`", result.test))
        if result.test_without_overlaps is not None:
            rows.append((f"**external** `{result.folder}`, training overlaps removed", result.test_without_overlaps))
    return rows


def evaluation_rows(record: AnyRecord) -> list[tuple[str, TestScores]]:
    """(label, test section) per ``cxr evaluate`` record kept beside the run (``evaluations/<when>-<checkpoint>/
    metrics.json``), and its test-time augmentation scores where it has them."""
    rows = []
    for path in sorted((record.source.parent / "evaluations").glob("*/metrics.json")):
        evaluation = read_metrics(path)
        label = f"**evaluated** `{path.parent.name}`"
        rows.append((label, evaluation.test))
        if evaluation.test.tta is not None:
            rows.append((f"{label}, test-time augmentation", evaluation.test.tta))
    return rows


def shortcut_baseline(runs: Sequence[AnyRecord]) -> dict[str, Any] | None:
    """The shortcut baseline of the first run that has one (runs on one dataset share it)."""
    found = (getattr(m, "shortcut_baseline", None) for m in runs)
    return next((baseline for baseline in found if isinstance(baseline, dict)), None)


def audit_baseline(assets: Path, runs: Sequence[AnyRecord]) -> dict[str, Any] | None:
    """The shortcut baseline of ``assets/audit.json`` (written by ``cxr audit --out assets``) when the runs
    predate the baseline and the audit read their dataset: the same folder name and test images per class."""
    path = assets / "audit.json"
    if not runs or not path.is_file():
        return None
    audit = read_json(path)
    baseline, dataset = audit.get("shortcut_baseline"), getattr(runs[0], "dataset", None)
    test_counts = audit.get("splits", {}).get("test", {}).get("counts")
    if not isinstance(baseline, dict) or Path(audit.get("root", "")).name != (dataset and dataset.name):
        return None
    if test_counts is not None and test_counts != (dataset.counts.get("test") if dataset else None):
        return None
    return {**baseline, "_from": ", from `cxr audit`"}


def runs_table(runs: Sequence[AnyRecord], base: Path) -> str:
    """How each run was made: epochs, training time, device, weights, dataset and links to its figures."""
    header = ["experiment", "epochs (run/planned)", "train time (whole run)", "device", "weights",
              "dataset (train/val/test images)", "figures"]
    rows = [
        [f"`{_name(m)}`", _epochs_text(m), _time_text(m), _device_text(m),
         weights_text(m), _dataset_text(m), figure_links(m, base)]
        for m in runs
    ]
    return _markdown_table(header, rows)


def weights_text(run: AnyRecord | Mapping[str, Any]) -> str:
    """The weights a run started from: imagenet, none, or a local file by name and the start of its SHA-256
    (the path it had on the machine that trained says nothing elsewhere)."""
    record = as_record(run)
    local = _training(record).weights_file
    if local:
        return f"{local.name} (sha256 {local.sha256[:12]})"
    weights = getattr(record, "weights", None)
    return "unknown" if weights is None else str(weights)


def _time_text(record: AnyRecord) -> str:
    """The training loop's time, then the whole run's (data audit, feature extraction, evaluation): a head trained
    on cached features takes a fraction of a second of a run that lasted minutes."""
    timings = record.timings if isinstance(record, RunRecord) else Timings(None, getattr(record, "wall_seconds", None))
    whole = timings.wall_seconds
    return format_duration(timings.train_seconds) + (f" ({format_duration(whole)})" if whole else "")


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _distinct(values: Iterable[Any]) -> str:
    unique = list(dict.fromkeys(str(v) for v in values if v not in (None, "")))
    return ", ".join(unique) if unique else "unknown"


def provenance(runs: Sequence[AnyRecord]) -> str:
    """One paragraph, built from the metrics only, saying where the numbers come from."""
    datasets = []
    for record in runs:
        dataset = getattr(record, "dataset", None)
        sizes = split_sizes(record)
        val_note = {"carve": " carved from train", "given": " (Kaggle's own)"}.get(dataset and dataset.val_source, "")
        parts = [f"{sizes[s]} {s}{val_note if s == 'val' else ''}" for s in ("train", "val", "test") if s in sizes]
        datasets.append(f"{_dataset_name(record)} ({', '.join(parts)} images)" if parts else _dataset_name(record))
    dates = sorted({str(m.date)[:10] for m in runs if getattr(m, "date", None)})
    date_text = "unknown" if not dates else dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    return (
        f"Provenance (generated by `cxr report` from `metrics.json`): dataset {_distinct(datasets)}; "
        f"weights {_distinct(weights_text(m) for m in runs)}; device {_distinct(_device_text(m) for m in runs)}; "
        f"date {date_text}; commit {_distinct(getattr(m, 'git_commit', None) for m in runs)}. "
        "Scores are on the test split, which was used for nothing else"
        + ("; brackets hold macro-F1's bootstrap 95% confidence interval (every score's is in the run's model card)."
           if any(m.test.ci95 for m in runs) else ".")
    )


def render_results(runs: Sequence[AnyRecord | Mapping[str, Any]], base: str | os.PathLike = ".",
                   baseline: dict[str, Any] | None = None) -> str:
    """The README block between the markers (markers included)."""
    base = Path(base)
    runs = [as_record(m) for m in runs]
    return "\n\n".join([
        START_MARKER,
        "<!-- generated by `cxr report`; edits here are overwritten -->",
        scores_table(runs, baseline),
        runs_table(runs, base),
        provenance(runs),
        END_MARKER,
    ])


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _view_score(scores: dict[str, Any] | None) -> str:
    scores = scores or {}
    return format_score(scores.get("macro_f1"), interval(scores.get("ci95") or {}, "macro_f1"), digits=2)


def _control_mean(checks: dict[str, Any], mode: str) -> str:
    views = (checks.get("controls") or {}).get("views") or {}
    values = [v["macro_f1"] for name, v in views.items() if name.endswith(f"_{mode}")]
    return format_score(sum(values) / len(values), digits=2) if values else "n/a"


def _same_source_auroc(test: TestScores) -> str:
    entry = test.pairwise_auroc.get(pair_name(*SAME_SOURCE_PAIRS[0])) or {}
    return format_score(entry.get("auroc"), entry.get("ci95"), digits=2)


def shortcuts_table(runs: Sequence[AnyRecord]) -> str:
    """Per run: test macro-F1 as is, with the lung field and with an equal area outside it hidden or shown
    alone (the model, masked at test time), the train-on-view probes, the same-source pair's AUROC and
    Grad-CAM's mass in the lung field. Older metrics.json files lack some: n/a; a run with none of the checks has
    no row (:func:`render_shortcuts` names it)."""
    header = ["experiment", "as is", "lungs hidden", "equal area hidden", "only the lungs", "only an equal area",
              "probe outside the lungs", "probe on the lungs", "NORMAL vs PNEUMONIA AUROC (same source)",
              "Grad-CAM in the lungs (their area)"]
    rows = []
    for record in [run for run in runs if run.shortcuts]:
        checks = record.shortcuts
        views, probes = checks.get("views", {}), checks.get("probes") or {}
        saliency = checks.get("saliency") or {}
        rows.append([f"`{_name(record)}`", _view_score(views.get("as_is")), _view_score(views.get("lungs_hidden")),
                     _control_mean(checks, "hidden"), _view_score(views.get("lungs_only")),
                     _control_mean(checks, "only"), _view_score(probes.get("lungs_hidden")),
                     _view_score(probes.get("lungs_only")), _same_source_auroc(record.test),
                     f"{_share(saliency.get('lung_share'))} ({_share(saliency.get('lung_area_share'))})"])
    return _markdown_table(header, rows)


def baseline_verdict(test: TestScores | Mapping[str, Any], baseline: dict[str, Any] | None,
                     with_data: bool = True) -> str | None:
    """Whether a model's test macro-F1 beats the shortcut baseline's, read with both bootstrap intervals, and
    (``with_data``) which images the baseline's number comes from."""
    if baseline is None:
        return None
    test = _scores(test)
    score, reference = test.macro_f1, baseline["test"]["macro_f1"]
    if score is None:
        return None
    low = interval(test.ci95, "macro_f1")
    high = interval(baseline["test"].get("ci95") or {}, "macro_f1")
    return " ".join([_verdict(score, reference, low, high), baseline_data(baseline) if with_data else ""]).strip()


def baseline_data(baseline: dict[str, Any]) -> str:
    """Which images the baseline's score comes from: it moves with the split and the --limit it learned from."""
    if "train_images" not in baseline:
        return ""
    return (f"(The baseline learned from {baseline['train_images']} images of "
            f"{baseline.get('trained_on', 'the train split')} and was tested on {baseline.get('test_images', '?')}.)")


def _verdict(score: float, reference: float, low: Sequence[float] | None, high: Sequence[float] | None) -> str:
    if score <= reference:
        return (f"It does no better than the shortcut baseline, which never sees the lungs "
                f"(macro-F1 {score:.2f} against {reference:.2f}).")
    if low is not None and high is not None and low[0] <= high[1]:
        return (f"It scores above the shortcut baseline (macro-F1 {score:.2f} against {reference:.2f}), but "
                "their 95% intervals overlap: not clearly better than image statistics alone.")
    return f"It beats the shortcut baseline (macro-F1 {score:.2f} against {reference:.2f}; intervals apart)."


def external_sentence(result: ExternalRecord) -> str:
    """One external evaluation in words: where its images were sent (absent classes included), the model's
    accuracy beside the no-anatomy baseline's on the same folder, and whether overlaps were audited."""
    test = result.test
    parts = [f"on external `{result.folder}` ({test.get('images', '?')} images) accuracy "
             f"{format_score(test.accuracy, digits=2)}"]
    baseline = (result.shortcut_baseline or {}).get("test")
    if baseline:
        parts[0] += f" (no-anatomy baseline {baseline['accuracy']:.2f})"
    shares = test.class_shares
    parts += [shares_short(shares.get("shares") or {}, shares.get("absent") or []), same_source_short(test)]
    if not result.overlaps.get("audited", True):
        parts.append("overlap with training not audited")
    text = "; ".join(p for p in parts if p)
    return text[0].upper() + text[1:] + "."


def same_source_short(test: TestScores | Mapping[str, Any]) -> str | None:
    """The same-source pair's AUROC in a clause (None where it is not measured or undefined)."""
    entry = _scores(test).pairwise_auroc.get(pair_name(*SAME_SOURCE_PAIRS[0])) or {}
    if entry.get("auroc") is None:
        return None
    return f"{pair_name(*SAME_SOURCE_PAIRS[0])} (one source) AUROC {format_score(entry['auroc'], entry.get('ci95'), 2)}"


def run_conclusion(run: AnyRecord | Mapping[str, Any], baseline: dict[str, Any] | None,
                   with_data: bool = True, saliency: bool = True) -> str:
    """The plain conclusion of one run's checks, every word chosen by its numbers (``with_data``: say which
    images the baseline learned from; README's section says it once, above the runs; ``saliency``: Grad-CAM's
    sentence, which README leaves to its table's column and the model card). A metrics.json whose masked
    scores predate the equal-area control is not read for the lungs: its drops cannot tell them from the
    surprise of a grey shape."""
    record = as_record(run)
    checks = record.shortcuts
    parts = [baseline_verdict(record.test, baseline, with_data)]
    if checks and checks.get("controls"):
        parts += [checks.get("short") or checks.get("sentence"), saliency and checks.get("saliency_sentence")]
    elif checks:
        parts.append("Its masked scores predate the equal-area control and the probes, so they say nothing about "
                     "the lungs; re-evaluate it (`cxr evaluate`).")
    same_source = same_source_short(record.test)
    parts += [same_source and same_source[0].upper() + same_source[1:] + ".", record.test.groups.get("sentence")]
    parts += [external_sentence(result) for result in (external_results(record) if record.source else [])]
    return " ".join(p for p in parts if p)


def render_shortcuts(runs: Sequence[AnyRecord | Mapping[str, Any]], baseline: dict[str, Any] | None = None) -> str:
    """The "What the models learn" block between the shortcuts markers (markers included)."""
    runs = [as_record(m) for m in runs]
    baseline = baseline or shortcut_baseline(runs)
    if baseline is None:
        intro = "No run recorded the shortcut baseline (its metrics.json predates it)."
    else:
        intro = (f"The shortcut baseline ({len(baseline['features'])} file and border statistics, never the lung "
                 f"field; `cxr.audit.source_baseline`) reaches test macro-F1 "
                 f"{format_score(baseline['test']['macro_f1'], interval(baseline['test'].get('ci95') or {}, 'macro_f1'))}"
                 f" and accuracy {format_score(baseline['test']['accuracy'], interval(baseline['test'].get('ci95') or {}, 'accuracy'))}"
                 f" on {baseline['test_images']} test images, having learned from {baseline.get('train_images', '?')} "
                 f"images of {baseline.get('trained_on', 'the train split')}.")
    conclusions = [f"- `{_name(m)}`: {run_conclusion(m, baseline, with_data=False, saliency=False)}" for m in runs]
    unchecked = [f"`{_name(m)}`" for m in runs if not m.shortcuts]
    if unchecked:
        conclusions.append(f"- No masked, probe or saliency checks in the metrics.json of {', '.join(unchecked)} "
                           "(written before the checks existed): re-run them.")
    return "\n\n".join([SHORTCUTS_START, "<!-- generated by `cxr report`; edits here are overwritten -->", intro,
                         shortcuts_table(runs), "\n".join(conclusions), SHORTCUTS_END])


def _replace_between(text: str, start_marker: str, end_marker: str, block: str) -> str:
    start, end = text.find(start_marker), text.find(end_marker)
    return text[:start] + block + text[end + len(end_marker):]


def replace_shortcuts(text: str, block: str) -> str:
    """``text`` with its "What the models learn" block replaced; unchanged when it has no such markers."""
    start, end = text.find(SHORTCUTS_START), text.find(SHORTCUTS_END)
    return text if start < 0 or end < start else _replace_between(text, SHORTCUTS_START, SHORTCUTS_END, block)


def replace_results(text: str, block: str) -> str:
    """``text`` with everything from the start marker to the end marker replaced by ``block``."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise ReportError(
            f"README has no results section; add a line {START_MARKER} followed by a line {END_MARKER} "
            "where the table should go."
        )
    return text[:start] + block + text[end + len(END_MARKER):]


def _listed_runs(text: str) -> list[str]:
    """The experiments named in the first table of README's current results block."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    block = text[start:end] if 0 <= start < end else ""
    names = []
    for line in block.splitlines():
        if not line.startswith("| `"):
            if names:
                break  # the scores table ended; the runs table repeats the names
            continue
        names.append(line.split("`")[1])
    return names


def repository_root(readme: Path) -> Path:
    """The checkout holding ``readme`` (the nearest folder with ``.git``), else the README's own folder."""
    folder = readme.resolve().parent
    return next((f for f in (folder, *folder.parents) if (f / ".git").exists()), folder)


def _check_inside(assets: Path, readme: Path) -> None:
    """README links to the figures by relative paths: results outside its repository would be dead links
    for every other reader, so they are refused rather than written."""
    root = repository_root(readme)
    try:
        assets.resolve().relative_to(root)
    except ValueError:
        raise ReportError(
            f"{str(assets)!r} is outside {str(root)!r}, the repository of {str(readme)!r}: its links would "
            "lead out of it. Copy the runs into the repository (e.g. assets/) first."
        ) from None


def write_report(assets: str | os.PathLike = "assets", readme: str | os.PathLike = "README.md") -> ReportChange:
    """Rewrite README's results section (and its "What the models learn" section, where it has the
    markers) from ``assets/*/metrics.json``; return which rows it wrote and which of the rows it found
    there it replaced or removed."""
    readme = Path(readme)
    if not readme.is_file():
        raise ReportError(f"README {str(readme)!r} does not exist; pass --readme PATH.")
    _check_inside(Path(assets), readme)
    runs = collect_metrics(assets)
    text = readme.read_text()
    before = _listed_runs(text)
    baseline = shortcut_baseline(runs) or audit_baseline(Path(assets), runs)
    results = replace_results(text, render_results(runs, readme.parent, baseline))
    readme.write_text(replace_shortcuts(results, render_shortcuts(runs, baseline)))
    written = [_name(m) for m in runs]
    return ReportChange(written, [n for n in before if n in written], [n for n in before if n not in written])


@dataclass(frozen=True)
class ReportChange:
    """What ``cxr report`` did to README's results table."""

    written: list[str]
    replaced: list[str]
    removed: list[str]

    def describe(self, readme: str, assets: str) -> str:
        text = f"{readme}: results of {', '.join(self.written)} from {assets}/*/metrics.json"
        if self.replaced:
            text += f"; replaced the rows of {', '.join(self.replaced)}"
        if self.removed:
            text += f"; removed the rows of {', '.join(self.removed)} (no metrics.json for them in {assets}/)"
        return text
