"""``model_card.md``: what a trained model is for, what it was trained on and how, how well it scores and
where it fails, generated beside ``metrics.json`` by every ``cxr train`` and ``cxr evaluate`` (never typed).

Every number comes from ``metrics.json`` (and ``external/*/metrics.json``); sections whose results a run
lacks (the shortcut checks, external validation) say so instead of being left out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from cxr.evaluate import metrics
from cxr.data.added_folders import added_sentence
from cxr.evaluate.breakdowns import same_source_sentence
from cxr.data.layout import CLASSES
from cxr.report.run_record import AnyRecord, ExternalRecord, RunRecord, TestScores, as_record, read_run_record

CARD_FILE = "model_card.md"
SOURCES = (
    "NORMAL and PNEUMONIA images come from the Kermany paediatric set (children aged 1-5 from one hospital).",
    "COVID19 images come from collections of adults' images, many of them figures from papers, some with "
    "arrows and text.",
    "TUBERCULOSIS images come from adult TB collections.",
    "So the class is also the source, the patients' age and the way the image was made: a model can score "
    "well by recognising where an image came from rather than any pathology.",
)


def _score(value: Any, interval: Any = None) -> str:
    if value is None:
        return "undefined"
    text = f"{value:.3f}"
    return text + (f" ({interval[0]:.3f}-{interval[1]:.3f})" if isinstance(interval, (list, tuple)) else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def metrics_lines(test: TestScores | Mapping[str, Any]) -> list[str]:
    """The table's metrics with intervals, per-class scores with the operating points, and the WHO check."""
    test = test if isinstance(test, TestScores) else TestScores(dict(test))
    lines = _table(["metric", "value (95% bootstrap interval)"],
                   [[m.label, _score(test.value(m), test.interval(m))]
                    for m in metrics.summary_metrics() if m.name in test])
    points = test.get("operating_points") or {}
    header = ["class", *(m.label for m in metrics.class_metrics())]
    if points:
        header += ["threshold (val, 90% sensitivity)", "test sensitivity", "test specificity"]
    rows = []
    for name in CLASSES:
        row = [name, *(_score(test.value(m, name), test.interval(m, name)) for m in metrics.class_metrics())]
        if points:
            point = points.get(name) or {}
            row += [_score(point.get("threshold")), _score(point.get("sensitivity")), _score(point.get("specificity"))]
        rows.append(row)
    lines += [""] + _table(header, rows)
    if points:
        lines += ["", metrics.who_tb_sentence(test.get("who_tb_screening"))]
    return lines


def _checks_lines(value: Any, depth: int = 0) -> list[str]:
    """Results whose layout this module does not fix (the shortcut checks): sentences and numbers, nested."""
    if not isinstance(value, dict):
        return [f"{'  ' * depth}- {value}"]
    lines = []
    for key, item in value.items():
        if isinstance(item, dict) and depth < 2:
            lines += [f"{'  ' * depth}- {key}:"] + _checks_lines(item, depth + 1)
        elif isinstance(item, float):
            lines.append(f"{'  ' * depth}- {key}: {item:.3f}")
        elif isinstance(item, (int, str, bool)) or item is None:
            lines.append(f"{'  ' * depth}- {key}: {item}")
    return lines


def pairwise_lines(test: TestScores) -> list[str]:
    """One-vs-one AUROC of every pair of classes, the pair that shares a source named (none in older files)."""
    pairs = test.pairwise_auroc
    if not pairs:
        return []
    rows = [[name + (" (the same source: Kermany children)" if entry.get("same_source") else ""),
             _score(entry.get("auroc"), entry.get("ci95")), str(entry.get("images", "?"))] for name, entry in pairs.items()]
    sentence = same_source_sentence(pairs)
    return ["", *_table(["pair", "AUROC (95% bootstrap interval)", "images"], rows), *(["", sentence] if sentence else [])]


def group_lines(test: TestScores) -> list[str]:
    """Scores per group (``--groups``) with counts; groups too small to score named."""
    groups = test.groups
    if not groups:
        return []
    rows = [[name, str(entry["images"]), _score(entry.get("accuracy"), (entry.get("ci95") or {}).get("accuracy")),
             _score(entry.get("macro_f1"), (entry.get("ci95") or {}).get("macro_f1"))]
            for name, entry in groups["groups"].items()]
    rows += [[name, str(entry["images"]), "too small to score", ""] for name, entry in groups["too_small"].items()]
    return ["", f"Per group ({groups['column']}):", "", *_table(["group", "images", "accuracy", "macro-F1"], rows),
            "", groups["sentence"]]


def external_lines(results: Sequence[ExternalRecord]) -> list[str]:
    if not results:
        return ["No external validation yet (`cxr evaluate EXPERIMENT --checkpoint C --external DIR`)."]
    lines = []
    for result in results:
        overlaps = result.overlaps
        lines += [f"### `{result.folder}` ({result.test.images} images, classes present: "
                  f"{', '.join(result.test['classes_present'])})", ""]
        if overlaps.get("warning"):
            lines += [f"**{overlaps['warning']}**", ""]
        if overlaps.get("audited") is False:
            lines += [f"Overlap not audited: {overlaps.get('note')}", ""]
        shares = result.test.class_shares.get("sentence")
        if shares:
            lines += [shares[0].upper() + shares[1:], ""]
        baseline = (result.shortcut_baseline or {}).get("test")
        if baseline:
            lines += [f"The no-anatomy baseline, fit on the training split, scores accuracy {baseline['accuracy']:.3f} "
                      f"and macro-F1 {baseline['macro_f1']:.3f} on this folder (the model: accuracy "
                      f"{_score(result.test.accuracy)}).", ""]
        lines += metrics_lines(result.test) + pairwise_lines(result.test) + group_lines(result.test)
        if result.test_without_overlaps:
            lines += ["", "Without the images that overlap training or validation:", ""]
            lines += metrics_lines(result.test_without_overlaps)
        lines.append("")
    return lines


def limitations(record: AnyRecord) -> list[str]:
    test = record.test
    items = [
        "Research only. Not validated on patients and not a medical device.",
        "Each class comes from its own sources (see Data): the scores may reflect the source, not the disease.",
        "NORMAL and PNEUMONIA are children's images, COVID19 and TUBERCULOSIS adults': the model has never "
        "seen a healthy adult or an adult with bacterial pneumonia.",
        f"The test split holds {sum(v.get('support', 0) for v in test.per_class.values()) or 'few'} "
        "images from the same sources as training; the bootstrap intervals say how much the scores could move.",
    ]
    if not getattr(record, "shortcut_baseline", None):  # an evaluation's record never holds it
        items.append("The shortcut baseline (a classifier that never sees the anatomy) was not measured for this run.")
    return [f"- {item}" for item in items]


def run_settings(record: AnyRecord) -> list[tuple[str, Any]]:
    """How the card's run was made beside its configuration: a training run's epochs, device and time, an
    evaluation's checkpoint (settings the record does not hold are left out)."""
    if isinstance(record, RunRecord):
        settings = [("seed", record.seed), ("epochs_run", record.epochs_run), ("best_epoch", record.best_epoch),
                    ("device", record.device), ("mixed_precision", record.mixed_precision),
                    ("train_seconds", record.timings.train_seconds)]
    else:
        settings = [("seed", getattr(record, "seed", None)),
                    ("evaluated_checkpoint", getattr(record, "evaluated_checkpoint", None)),
                    ("checkpoint_epoch", getattr(record, "checkpoint_epoch", None)),
                    ("device", getattr(record, "device", None))]
    return [(key, value) for key, value in settings if value is not None]


def model_card_text(run: AnyRecord | Mapping[str, Any], external: Sequence[ExternalRecord] | None = None) -> str:
    """The whole card as Markdown, from one run's metrics.json (its record, or the dict ``train_experiment``
    returns) and its external results."""
    record = as_record(run)
    config = getattr(record, "config", {})
    dataset = getattr(record, "dataset", None)
    recipe = [[str(k), f"`{v}`"] for k, v in config.items() if k not in ("name", "summary")]
    recipe += [[k, f"`{v}`"] for k, v in run_settings(record)]
    local = getattr(record, "weights_file", None)
    if local:  # a local file: its name and digest say more than the path it had
        recipe.append(["weights file", f"`{local.name}` (sha256 `{local.sha256}`)"])
    counts = dataset.counts if dataset else {}
    lines = [
        f"# Model card: `{record.experiment or '?'}`", "",
        f"Generated by `cxr` from `metrics.json` (commit {getattr(record, 'git_commit', None) or 'unknown'}, "
        f"{getattr(record, 'date', None) or 'date unknown'}); do not edit, it is rewritten by every train and "
        "evaluate.", "",
        "## Intended use", "",
        "Research and teaching on chest X-ray classification (COVID19, NORMAL, PNEUMONIA, TUBERCULOSIS) only. "
        "**Not for diagnosis, triage or screening of any patient**, and not a medical device.", "",
        "## Data", "",
        f"Dataset `{(dataset and dataset.name) or 'unknown'}`, validation split: "
        f"{(dataset and dataset.val_source) or 'unknown'}.", "",
        *(_table(["split", *CLASSES], [[s, *(str(c.get(k, 0)) for k in CLASSES)] for s, c in counts.items()])
          if counts else ["Image counts unknown."]),
        *(["", added] if (added := added_sentence(getattr(record, "added_training", None))) else []),
        "", *(f"- {line}" for line in SOURCES), "",
        "## Training recipe", "",
        f"{config.get('summary', '')}".strip(), "",
        *_table(["setting", "value"], recipe), "",
        "## Test metrics", "",
        *metrics_lines(record.test), *pairwise_lines(record.test), *group_lines(record.test), "",
        "## Shortcut checks", "",
    ]
    for found, title in ((getattr(record, "shortcut_baseline", None), "Baseline that never sees the anatomy"),
                         (record.shortcuts, "Masked evaluation and saliency")):
        found = _checks_lines(found) if found else ["Not computed for this run."]
        lines += [f"### {title}", "", *found]
        lines.append("")
    lines += ["## External validation", "", *external_lines(external or []), "## Known limitations", "",
              *limitations(record), ""]
    return "\n".join(lines)


def read_external(run_dir: Path) -> list[ExternalRecord]:
    return [read_run_record(p) for p in sorted(Path(run_dir).glob("external/*/metrics.json"))]


def write_model_card(run_dir: str | os.PathLike, run: AnyRecord | Mapping[str, Any] | None = None) -> Path:
    """Write ``run_dir/model_card.md`` from ``metrics`` (default: ``run_dir/metrics.json``) and the run's
    external results; return its path."""
    run_dir = Path(run_dir)
    run = run if run is not None else read_run_record(run_dir / "metrics.json")
    path = run_dir / CARD_FILE
    path.write_text(model_card_text(run, read_external(run_dir)))
    return path
