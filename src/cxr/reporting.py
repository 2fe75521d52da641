"""Figures and report files for one evaluated experiment."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator
from scipy.special import softmax
from sklearn.metrics import classification_report, confusion_matrix, roc_curve

from .figures import save_figure
from . import metrics
from .data import load_image


def plot_history(history: Sequence[dict[str, float]], path: Path | None = None, title: str = "") -> plt.Figure:
    """Loss per epoch, train against validation, then one panel per metric the table records per epoch
    (:func:`cxr.metrics.history_metrics`, those the history has): validation, and train where it has it."""
    frame = pd.DataFrame(history)
    scores = [m for m in metrics.history_metrics() if f"val_{m.name}" in frame]
    figure, axes = plt.subplots(1, 1 + len(scores), figsize=(5.5 * (1 + len(scores)), 4), squeeze=False)
    loss_axis = axes[0, 0]
    loss_axis.plot(frame["epoch"], frame["train_loss"], "o-", label="train")
    loss_axis.plot(frame["epoch"], frame["val_loss"], "o-", label="validation")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss")
    for metric, axis in zip(scores, axes[0, 1:]):
        columns = [(f"{split}_{metric.name}", label) for split, label in (("train", "train"), ("val", "validation"))
                   if f"{split}_{metric.name}" in frame]
        for column, label in columns:
            axis.plot(frame["epoch"], frame[column], "o-", label=f"{label} {metric.label}")
        axis.set(xlabel="epoch", ylabel=metric.label, title=metric.label[:1].upper() + metric.label[1:])
        values = frame[[column for column, _ in columns]].to_numpy(dtype=float)
        if np.isfinite(values).any() and np.nanmin(values) >= 0 and np.nanmax(values) <= 1:
            axis.set_ylim(0, 1.02)
    losses = frame[["train_loss", "val_loss"]].to_numpy()
    if np.isfinite(losses).all() and losses.min() > 0 and losses.max() / losses.min() > 100:
        loss_axis.set_yscale("log")  # a diverging run would otherwise flatten every other point
    for axis in axes.flat:
        if len(frame) <= 10:
            axis.set_xticks(frame["epoch"])
        else:
            axis.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path, dpi=120)
    return figure


def plot_confusion(labels: np.ndarray, predictions: np.ndarray, classes: Sequence[str], path: Path | None = None,
                   title: str = "") -> plt.Figure:
    """Confusion matrix twice: counts, and rows normalised to recall."""
    counts = confusion_matrix(labels, predictions, labels=range(len(classes)))
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    sns.heatmap(counts, annot=True, fmt="d", cmap="Blues", xticklabels=classes, yticklabels=classes, ax=axes[0], cbar=False)
    sns.heatmap(normalised, annot=True, fmt=".2f", cmap="Blues", vmin=0, vmax=1, xticklabels=classes,
                yticklabels=classes, ax=axes[1], cbar=False)
    axes[0].set(title="Counts", xlabel="predicted", ylabel="true")
    axes[1].set(title="Row-normalised (recall on the diagonal)", xlabel="predicted", ylabel="true")
    figure.suptitle(title)
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path, dpi=120)
    return figure


def plot_predictions(paths: Sequence[Path], labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str],
                     path: Path | None = None, count: int = 16, seed: int = 0, title: str = "") -> plt.Figure:
    """A grid of test images with predicted and true label and the predicted probability; mistakes in red.
    Half the grid shows mistakes when there are any, so the figure teaches something."""
    rng = np.random.default_rng(seed)
    predictions = probabilities.argmax(1)
    wrong, right = np.flatnonzero(predictions != labels), np.flatnonzero(predictions == labels)
    n_wrong = min(len(wrong), count // 2)
    chosen = np.concatenate([rng.permutation(wrong)[:n_wrong], rng.permutation(right)[: count - n_wrong]])
    chosen = rng.permutation(chosen)[:count]
    columns = 4
    rows = max(1, int(np.ceil(len(chosen) / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.5 * rows), squeeze=False,
                                layout="constrained")  # leaves room for the title above the first row's titles
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, chosen):
        image = load_image(paths[index])
        image.thumbnail((256, 256))
        axis.imshow(image)
        ok = predictions[index] == labels[index]
        axis.set_title(
            f"pred {classes[predictions[index]]} ({probabilities[index, predictions[index]]:.2f})\n"
            f"true {classes[labels[index]]}" + ("" if ok else "  ✗"),
            color="black" if ok else "crimson", fontsize=9,
        )
        if not ok:
            for spine in axis.spines.values():
                spine.set(visible=True, color="crimson", linewidth=3)
            axis.axis("on")
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(title)
    if path is not None:
        save_figure(figure, path, dpi=110)
    return figure


def classification_metrics(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """The table's metrics (:mod:`cxr.metrics`: accuracy, macro-F1, balanced accuracy, macro AUROC, ...),
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


def plot_roc(labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], path: Path | None = None,
             title: str = "", operating_points: dict[str, Any] | None = None) -> plt.Figure:
    """One-vs-rest ROC curve per class with its AUROC, and (if given) each class's operating point chosen
    on validation, drawn where it lands on this split; a class with no positive or negative image is noted."""
    figure, axis = plt.subplots(figsize=(6, 5.5), layout="constrained")
    values = metrics.auroc(labels, probabilities)
    for k, name in enumerate(classes):
        positive = np.asarray(labels) == k
        if not np.isfinite(values[k]):
            axis.plot([], [], " ", label=f"{name}: AUROC undefined (one class present)")
            continue
        false_rate, true_rate, _ = roc_curve(positive, probabilities[:, k])
        line, = axis.plot(false_rate, true_rate, label=f"{name}: AUROC {values[k]:.3f}")
        point = (operating_points or {}).get(name)
        if point and point["sensitivity"] is not None and point["specificity"] is not None:
            axis.plot(1 - point["specificity"], point["sensitivity"], "o", color=line.get_color(), clip_on=False,
                      zorder=3)  # a point at 1 - specificity = 1 is drawn whole, not cut in half by the frame
    axis.plot([0, 1], [0, 1], "k--", alpha=0.5, label="chance")
    axis.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
             xlim=(-0.01, 1.01), ylim=(-0.01, 1.02))
    axis.set_title(textwrap.fill(title or "ROC, one class against the rest", 60), fontsize=10)
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(alpha=0.3)
    if path is not None:
        save_figure(figure, path, dpi=120)
    return figure


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
