"""One figure that sets the experiments side by side: each test metric with its bootstrap 95% interval."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from cxr.evaluate.figures import save_figure
from cxr.evaluate import metrics
from cxr.report.run_record import AnyRecord, RunRecordError, as_record, read_run_record

def figure_label(metric: metrics.Metric) -> str:
    return metric.label.replace(" ", "\n")


SUMMARY_METRICS = {m.name: figure_label(m) for m in metrics.summary_metrics()}


def read_metrics(path: str | os.PathLike) -> AnyRecord:
    """A ``metrics.json`` written by ``cxr train`` (any version, upgraded), checked for the parts the figure needs."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist; train or evaluate an experiment first.")
    try:
        record = read_run_record(path)
    except RunRecordError as error:
        raise ValueError(f"{str(path)!r} is not a readable metrics.json ({error}).") from None
    if "accuracy" not in record.test:
        raise ValueError(f"{str(path)!r} has no test results; is it a metrics.json written by cxr train?")
    return record


def metric_table(run: AnyRecord | Mapping[str, Any]) -> dict[str, tuple[float | None, list[float] | None]]:
    """``{label: (point, [lo, hi] or None)}`` for every metric of the table, per class as ``label\nclass``
    (those a metrics.json from before a metric existed lacks are left out)."""
    test = as_record(run).test
    rows = {figure_label(m): (test.value(m), test.interval(m)) for m in metrics.summary_metrics() if m.name in test}
    for m in metrics.class_metrics():
        for name, scores in test.per_class.items():
            if m.name in scores:
                rows[f"{m.label}\n{name}"] = (scores[m.name], test.interval(m, name))
    return rows


def run_labels(runs: Sequence[AnyRecord | Mapping[str, Any]], paths: Sequence[str | os.PathLike]) -> list[str]:
    """Each run's legend entry: its experiment, and where two runs share one, the folder that tells them apart
    (two identical entries would hide which points are whose)."""
    names = [str(as_record(run).experiment or Path(path).parent.name) for run, path in zip(runs, paths)]
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
    labels = list(dict.fromkeys(label for scores in tables for label in scores))
    width = 0.8 / len(runs)
    figure, axis = plt.subplots(figsize=(max(8, 1.3 * len(labels) + 2), 5), layout="constrained")
    for number, (run, scores) in enumerate(zip(runs, tables)):
        offset = (number - (len(runs) - 1) / 2) * width
        points, below, above = [], [], []
        for label in labels:
            point, interval = scores.get(label, (None, None))
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
