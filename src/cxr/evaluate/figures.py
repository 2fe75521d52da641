"""The figures of one evaluated run (training curves, confusion matrix, example predictions, ROC) and the one
way every figure of the package is saved: a figure that cannot be written (a full disk, a file system gone
read-only) is reported in one warning line and listed by :func:`save_figure`, and the run goes on to write its
metrics.json, which is small and holds what the figures only show."""

from __future__ import annotations

import contextlib
import contextvars
import os
import textwrap
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import confusion_matrix, roc_curve

from cxr.evaluate import metrics
from cxr.data.dataset import load_image

_UNWRITTEN: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("unwritten_figures", default=None)


class FigureNotWritten(UserWarning):
    """A figure file could not be written; the numbers it shows are kept elsewhere."""


def save_figure(figure: Any, path: str | os.PathLike, **options: Any) -> bool:
    """``figure.savefig(path, **options)``; on an OSError the partial file is removed, a one-line warning
    names the figure and the reason, and False is returned (the name is listed by :func:`unwritten_figures`)."""
    path = Path(path)
    try:
        figure.savefig(path, **options)
        return True
    except OSError as error:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        listed = _UNWRITTEN.get()
        if listed is not None:
            listed.append(path.name)
        warnings.warn(f"figure {str(path)!r} could not be written ({error.strerror or error}); the scores it "
                      "shows are kept in the run's JSON files.", FigureNotWritten, stacklevel=2)
        return False


@contextlib.contextmanager
def unwritten_figures() -> Iterator[list[str]]:
    """The names of the figures :func:`save_figure` could not write while the block ran."""
    names: list[str] = []
    token = _UNWRITTEN.set(names)
    try:
        yield names
    finally:
        _UNWRITTEN.reset(token)


def plot_history(history: Sequence[dict[str, float]], path: Path | None = None, title: str = "") -> plt.Figure:
    """Loss per epoch, train against validation, then one panel per metric the table records per epoch
    (:func:`cxr.evaluate.metrics.history_metrics`, those the history has): validation, and train where it has it."""
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
