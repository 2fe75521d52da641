"""``model_card.md``: what a trained model is for, what it was trained on and how, how well it scores and
where it fails, generated beside ``metrics.json`` by every ``cxr train`` and ``cxr evaluate`` (never typed).

Every number comes from ``metrics.json`` (and ``external/*/metrics.json``); sections whose results a run
lacks (the shortcut checks, external validation) say so instead of being left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import metrics as table
from .added_folders import added_sentence
from .breakdowns import same_source_sentence
from .layout import CLASSES

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


def metrics_lines(test: dict[str, Any]) -> list[str]:
    """The table's metrics with intervals, per-class scores with the operating points, and the WHO check."""
    lines = _table(["metric", "value (95% bootstrap interval)"],
                   [[m.label, _score(table.stored_value(test, m), table.stored_interval(test, m))]
                    for m in table.summary_metrics() if m.name in test])
    points = test.get("operating_points") or {}
    header = ["class", *(m.label for m in table.class_metrics())]
    if points:
        header += ["threshold (val, 90% sensitivity)", "test sensitivity", "test specificity"]
    rows = []
    for name in CLASSES:
        row = [name, *(_score(table.stored_value(test, m, name), table.stored_interval(test, m, name))
                       for m in table.class_metrics())]
        if points:
            point = points.get(name) or {}
            row += [_score(point.get("threshold")), _score(point.get("sensitivity")), _score(point.get("specificity"))]
        rows.append(row)
    lines += [""] + _table(header, rows)
    if points:
        lines += ["", table.who_tb_sentence(test.get("who_tb_screening"))]
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


def pairwise_lines(test: dict[str, Any]) -> list[str]:
    """One-vs-one AUROC of every pair of classes, the pair that shares a source named (none in older files)."""
    pairs = test.get("pairwise_auroc")
    if not pairs:
        return []
    rows = [[name + (" (the same source: Kermany children)" if entry.get("same_source") else ""),
             _score(entry.get("auroc"), entry.get("ci95")), str(entry.get("images", "?"))] for name, entry in pairs.items()]
    sentence = same_source_sentence(pairs)
    return ["", *_table(["pair", "AUROC (95% bootstrap interval)", "images"], rows), *(["", sentence] if sentence else [])]


def group_lines(test: dict[str, Any]) -> list[str]:
    """Scores per group (``--groups``) with counts; groups too small to score named."""
    groups = test.get("groups")
    if not groups:
        return []
    rows = [[name, str(entry["images"]), _score(entry.get("accuracy"), (entry.get("ci95") or {}).get("accuracy")),
             _score(entry.get("macro_f1"), (entry.get("ci95") or {}).get("macro_f1"))]
            for name, entry in groups["groups"].items()]
    rows += [[name, str(entry["images"]), "too small to score", ""] for name, entry in groups["too_small"].items()]
    return ["", f"Per group ({groups['column']}):", "", *_table(["group", "images", "accuracy", "macro-F1"], rows),
            "", groups["sentence"]]


def external_lines(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return ["No external validation yet (`cxr evaluate EXPERIMENT --checkpoint C --external DIR`)."]
    lines = []
    for result in results:
        name, overlaps = result["external"]["folder"], result.get("overlaps", {})
        lines += [f"### `{name}` ({result['test']['images']} images, classes present: "
                  f"{', '.join(result['test']['classes_present'])})", ""]
        if overlaps.get("warning"):
            lines += [f"**{overlaps['warning']}**", ""]
        if overlaps.get("audited") is False:
            lines += [f"Overlap not audited: {overlaps.get('note')}", ""]
        shares = (result["test"].get("class_shares") or {}).get("sentence")
        if shares:
            lines += [shares[0].upper() + shares[1:], ""]
        baseline = (result.get("shortcut_baseline") or {}).get("test")
        if baseline:
            lines += [f"The no-anatomy baseline, fit on the training split, scores accuracy {baseline['accuracy']:.3f} "
                      f"and macro-F1 {baseline['macro_f1']:.3f} on this folder (the model: accuracy "
                      f"{_score(result['test'].get('accuracy'))}).", ""]
        lines += metrics_lines(result["test"]) + pairwise_lines(result["test"]) + group_lines(result["test"])
        if result.get("test_without_overlaps"):
            lines += ["", "Without the images that overlap training or validation:", ""]
            lines += metrics_lines(result["test_without_overlaps"])
        lines.append("")
    return lines


def limitations(metrics: dict[str, Any]) -> list[str]:
    test = metrics["test"]
    items = [
        "Research only. Not validated on patients and not a medical device.",
        "Each class comes from its own sources (see Data): the scores may reflect the source, not the disease.",
        "NORMAL and PNEUMONIA are children's images, COVID19 and TUBERCULOSIS adults': the model has never "
        "seen a healthy adult or an adult with bacterial pneumonia.",
        f"The test split holds {sum(v.get('support', 0) for v in test.get('per_class', {}).values()) or 'few'} "
        "images from the same sources as training; the bootstrap intervals say how much the scores could move.",
    ]
    baseline = metrics.get("shortcut_baseline")
    if not baseline:
        items.append("The shortcut baseline (a classifier that never sees the anatomy) was not measured for this run.")
    return [f"- {item}" for item in items]


def model_card_text(metrics: dict[str, Any], external: list[dict[str, Any]] | None = None) -> str:
    """The whole card as Markdown, from one run's metrics.json and its external results."""
    config = metrics.get("config", {})
    dataset = metrics.get("dataset", {})
    recipe = [[str(k), f"`{v}`"] for k, v in config.items() if k not in ("name", "summary")]
    recipe += [[k, f"`{metrics[k]}`"] for k in ("seed", "epochs_run", "best_epoch", "evaluated_checkpoint",
                                                 "checkpoint_epoch", "device", "mixed_precision", "train_seconds")
               if k in metrics]
    if metrics.get("weights_file"):  # a local file: its name and digest say more than the path it had
        local = metrics["weights_file"]
        recipe.append(["weights file", f"`{local['name']}` (sha256 `{local['sha256']}`)"])
    counts = dataset.get("counts", {})
    lines = [
        f"# Model card: `{metrics.get('experiment', '?')}`", "",
        f"Generated by `cxr` from `metrics.json` (commit {metrics.get('git_commit', 'unknown')}, "
        f"{metrics.get('date', 'date unknown')}); do not edit, it is rewritten by every train and evaluate.", "",
        "## Intended use", "",
        "Research and teaching on chest X-ray classification (COVID19, NORMAL, PNEUMONIA, TUBERCULOSIS) only. "
        "**Not for diagnosis, triage or screening of any patient**, and not a medical device.", "",
        "## Data", "",
        f"Dataset `{dataset.get('name', 'unknown')}`, validation split: {dataset.get('val_source', 'unknown')}.", "",
        *(_table(["split", *CLASSES], [[s, *(str(c.get(k, 0)) for k in CLASSES)] for s, c in counts.items()])
          if counts else ["Image counts unknown."]),
        *(["", added] if (added := added_sentence(metrics.get("added_training"))) else []),
        "", *(f"- {line}" for line in SOURCES), "",
        "## Training recipe", "",
        f"{config.get('summary', '')}".strip(), "",
        *_table(["setting", "value"], recipe), "",
        "## Test metrics", "",
        *metrics_lines(metrics["test"]), *pairwise_lines(metrics["test"]), *group_lines(metrics["test"]), "",
        "## Shortcut checks", "",
    ]
    for key, title in (("shortcut_baseline", "Baseline that never sees the anatomy"),
                       ("shortcuts", "Masked evaluation and saliency")):
        found = _checks_lines(metrics[key]) if metrics.get(key) else ["Not computed for this run."]
        lines += [f"### {title}", "", *found]
        lines.append("")
    lines += ["## External validation", "", *external_lines(external or []), "## Known limitations", "",
              *limitations(metrics), ""]
    return "\n".join(lines)


def read_external(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(run_dir).glob("external/*/metrics.json"))]


def write_model_card(run_dir: str | os.PathLike, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``run_dir/model_card.md`` from ``metrics`` (default: ``run_dir/metrics.json``) and the run's
    external results; return its path."""
    run_dir = Path(run_dir)
    metrics = metrics if metrics is not None else json.loads((run_dir / "metrics.json").read_text())
    path = run_dir / CARD_FILE
    path.write_text(model_card_text(metrics, read_external(run_dir)))
    return path
