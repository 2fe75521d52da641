"""TensorBoard event files for a training run, so runs can be compared with ``tensorboard --logdir assets``.

Per epoch: losses, accuracies, validation macro-F1 and the learning rate; at the end: the test metrics, the
confusion matrix (figure and text) and the configuration as hyperparameters. Written under
``<run>/tensorboard/``; a fresh run replaces the previous run's logs there, a resumed run adds to them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix

from cxr.evaluate import metrics
from cxr.evaluate.figures import plot_confusion
from cxr.data.layout import CLASSES
from cxr.report.run_record import RunRecord, TestScores

EPOCH_TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_accuracy": "accuracy/train",
    **{f"val_{m.name}": f"{m.name}/val" for m in metrics.METRICS if m.history},
    "lr": "learning_rate",
}


def test_scalars(results: TestScores | Mapping[str, Any]) -> dict[str, float]:
    """``{tag: value}`` of every table metric in a test section, per class as ``test/<name>_<class>``;
    undefined values (None) are left out."""
    test = results if isinstance(results, TestScores) else TestScores(dict(results))
    scalars = {f"test/{m.name}": test.value(m) for m in metrics.summary_metrics()}
    for m in metrics.class_metrics():
        scalars.update({f"test/{m.name}_{name}": test.value(m, name) for name in test.per_class})
    return {tag: float(value) for tag, value in scalars.items() if value is not None}


class RunLog:
    """One run's TensorBoard writer. It opens at the first finished epoch, so a run that fails before
    that leaves the previous logs alone, and it flushes every epoch, so an interrupted run keeps its curves."""

    def __init__(self, log_dir: str | Path, resume: bool = False) -> None:
        self.log_dir = Path(log_dir)
        self.resume = resume
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            if not self.resume:
                shutil.rmtree(self.log_dir, ignore_errors=True)
            self._writer = SummaryWriter(str(self.log_dir))
        return self._writer

    def on_epoch_end(self, then: Callable[[list[dict[str, float]]], None] | None = None):
        """A callback for ``engine.fit`` that logs the newest epoch, then calls ``then`` (if any)."""

        def callback(history: list[dict[str, float]]) -> None:
            row = history[-1]
            for key, tag in EPOCH_TAGS.items():
                self.writer.add_scalar(tag, row[key], row["epoch"])
            self.writer.flush()
            if then is not None:
                then(history)

        return callback

    def finish(self, record: RunRecord, labels: np.ndarray, predictions: np.ndarray) -> None:
        """Test metrics, confusion matrix and hyperparameters at the last epoch's step; closes the writer."""
        step = record.epochs_run
        for tag, value in test_scalars(record.test).items():
            self.writer.add_scalar(tag, value, step)
        figure = plot_confusion(labels, predictions, CLASSES, title=f"{record.experiment}: test split")
        self.writer.add_figure("test/confusion_matrix", figure, step)  # and closes the figure
        self.writer.add_text("test/confusion_matrix", confusion_table(labels, predictions, CLASSES), step)
        self.write_hparams(record)
        self.writer.close()

    def write_hparams(self, record: RunRecord) -> None:
        """The configuration (plus seed) in TensorBoard's HPARAMS tab, against the test scalars above."""
        from torch.utils.tensorboard.summary import hparams

        config = {**record.config, "seed": record.seed}
        values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}
        summaries = {f"test/{m.name}": record.test.value(m) for m in metrics.summary_metrics()}
        for summary in hparams(values, {tag: value for tag, value in summaries.items() if value is not None}):
            self.writer.file_writer.add_summary(summary)


def confusion_table(labels: np.ndarray, predictions: np.ndarray, classes: Sequence[str]) -> str:
    """The confusion matrix as a Markdown table (rows: true class, columns: predicted), for the TEXT tab."""
    counts = confusion_matrix(labels, predictions, labels=range(len(classes)))
    lines = ["| true \\ predicted | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(str(n) for n in row) + " |" for name, row in zip(classes, counts)]
    return "\n".join(lines)
