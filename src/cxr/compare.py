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


def run_labels(runs: Sequence[dict[str, Any]], paths: Sequence[str | os.PathLike]) -> list[str]:
    """Each run's legend entry: its experiment, and where two runs share one, the folder that tells them apart
    (two identical entries would hide which points are whose)."""
    names = [str(run.get("experiment") or Path(path).parent.name) for run, path in zip(runs, paths)]
    folders = [Path(path).resolve().parent for path in paths]
    labels = []
    for name, folder in zip(names, folders):
        twins = [f for n, f in zip(names, folders) if n == name]
        if len(twins) == 1:
            labels.append(name)
            continue
        common = Path(os.path.commonpath(twins)) if len(set(twins)) > 1 else folder.parent
        own = folder.relative_to(common).as_posix() if folder != common else folder.name
        labels.append(f"{name} ({own or folder.name})")
    return labels


def plot_comparison(paths: Sequence[str | os.PathLike], out_png: str | os.PathLike | None = None) -> plt.Figure:
    """Every experiment's test metrics (points) and 95% intervals (bars), grouped by metric."""
    if not paths:
        raise ValueError("no metrics.json given to compare")
    runs = [read_metrics(p) for p in paths]
    tables = [metric_table(run) for run in runs]
    names = run_labels(runs, paths)
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
                      label=names[number])
    axis.set_xticks(np.arange(len(labels)), labels)
    axis.set(ylim=(-0.02, 1.02), ylabel="test score", title="Test metrics with bootstrap 95% intervals")
    axis.grid(axis="y", alpha=0.3)
    figure.legend(loc="outside lower center", ncols=len(runs))
    if out_png is not None:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        save_figure(figure, out_png, dpi=120)
    return figure
