"""The classification report of one evaluated split: the table's metrics with sklearn's per-class report
(``classification_report.json``), its plain-text form (``classification_report.txt``), and the JSON writer
the results files go through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy.special import softmax
from sklearn.metrics import classification_report

from cxr.evaluate import metrics


def classification_metrics(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """The table's metrics (:mod:`cxr.evaluate.metrics`: accuracy, macro-F1, balanced accuracy, macro AUROC, ...),
    plus sklearn's per-class precision/recall/F1/support and macro and weighted averages. A per-class
    table metric goes into ``per_class`` beside them (AUROC None where a class has no positive or no
    negative image); where sklearn already gives one (recall), sklearn's value stays."""
    probabilities = softmax(logits.astype(np.float64), axis=1)
    predictions = probabilities.argmax(1)
    report = classification_report(labels, predictions, labels=range(len(classes)), target_names=list(classes),
                                   output_dict=True, zero_division=0)
    scores = metrics.point_scores(labels, predictions, classes, probabilities)
    per_class = {
        name: {
            "precision": float(report[name]["precision"]),
            "recall": float(report[name]["recall"]),
            "f1": float(report[name]["f1-score"]),
            "support": int(report[name]["support"]),
        }
        for name in classes
    }
    for metric in metrics.class_metrics():
        for name in classes:
            per_class[name].setdefault(metric.name, scores[metric.name][name])
    return {
        **{m.name: scores[m.name] for m in metrics.summary_metrics()},
        "weighted_f1": float(report["weighted avg"]["f1-score"]),
        "per_class": per_class,
        "macro_avg": {k.replace("-score", ""): float(v) for k, v in report["macro avg"].items()},
        "weighted_avg": {k.replace("-score", ""): float(v) for k, v in report["weighted avg"].items()},
    }


def report_text(scores: dict[str, Any], classes: Sequence[str]) -> str:
    """The classification report as a plain-text table (like sklearn's), plus the summary scores."""
    rows = [
        [name, m["precision"], m["recall"], m["f1"], m["support"]] for name, m in scores["per_class"].items()
    ]
    total = sum(m["support"] for m in scores["per_class"].values())
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        rows.append([label, scores[key]["precision"], scores[key]["recall"], scores[key]["f1"], total])
    frame = pd.DataFrame(rows, columns=["class", "precision", "recall", "f1", "support"]).set_index("class")
    summary = [f"{m.label:<19}" + ("n/a" if scores.get(m.name) is None else f"{scores[m.name]:.3f}")
               for m in metrics.summary_metrics() if m.name != "macro_f1"]  # macro-F1 is the macro avg row
    return frame.to_string(float_format=lambda v: f"{v:.3f}") + "\n\n" + "\n".join(summary) + "\n"


def write_json(data: Any, path: Path) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
