"""One figure that sets the experiments side by side: each test metric with its bootstrap 95% interval."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np

from .figures import save_figure
from . import metrics as table

def figure_label(metric: table.Metric) -> str:
    return metric.label.replace(" ", "\n")


SUMMARY_METRICS = {m.name: figure_label(m) for m in table.summary_metrics()}


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """A ``metrics.json`` written by ``cxr train``, checked for the parts the figure needs."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{str(path)!r} does not exist; train or evaluate an experiment first.") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not a readable metrics.json ({error}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("test"), dict) or "accuracy" not in data["test"]:
        raise ValueError(f"{str(path)!r} has no test results; is it a metrics.json written by cxr train?")
    return data


def metric_table(metrics: dict[str, Any]) -> dict[str, tuple[float | None, list[float] | None]]:
    """``{label: (point, [lo, hi] or None)}`` for every metric of the table, per class as ``label\nclass``
    (those a metrics.json from before a metric existed lacks are left out)."""
    test = metrics["test"]
    rows = {figure_label(m): (table.stored_value(test, m), table.stored_interval(test, m))
            for m in table.summary_metrics() if m.name in test}
    for m in table.class_metrics():
        for name, scores in test.get("per_class", {}).items():
            if m.name in scores:
                rows[f"{m.label}\n{name}"] = (scores[m.name], table.stored_interval(test, m, name))
    return rows


def plot_comparison(paths: Sequence[str | os.PathLike], out_png: str | os.PathLike | None = None) -> plt.Figure:
    """Every experiment's test metrics (points) and 95% intervals (bars), grouped by metric."""
    if not paths:
        raise ValueError("no metrics.json given to compare")
    runs = [read_metrics(p) for p in paths]
    tables = [metric_table(run) for run in runs]
    labels = list(dict.fromkeys(label for table in tables for label in table))
    width = 0.8 / len(runs)
    figure, axis = plt.subplots(figsize=(max(8, 1.3 * len(labels) + 2), 5), layout="constrained")
    for number, (run, table) in enumerate(zip(runs, tables)):
        offset = (number - (len(runs) - 1) / 2) * width
        points, below, above = [], [], []
        for label in labels:
            point, interval = table.get(label, (None, None))
            point = np.nan if point is None else float(point)
            low, high = interval if interval else (point, point)
            points.append(point)
            below.append(max(point - low, 0.0))
            above.append(max(high - point, 0.0))
        axis.errorbar(np.arange(len(labels)) + offset, points, yerr=[below, above], fmt="o", capsize=4,
                      label=run.get("experiment", Path(paths[number]).parent.name))
    axis.set_xticks(np.arange(len(labels)), labels)
    axis.set(ylim=(-0.02, 1.02), ylabel="test score", title="Test metrics with bootstrap 95% intervals")
    axis.grid(axis="y", alpha=0.3)
    figure.legend(loc="outside lower center", ncols=len(runs))
    if out_png is not None:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        save_figure(figure, out_png, dpi=120)
    return figure
