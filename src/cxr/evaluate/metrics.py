"""The one table of metrics: every score that validation, the test evaluation, the bootstrap intervals,
TensorBoard, ``cxr report``, ``cxr compare``, the CLI summary and the notebooks show comes from ``METRICS``.

Adding a metric is one ``Metric`` entry. A metric reads either confusion matrices of shape ``(..., K, K)``
(rows: true class), which lets the bootstrap score a thousand resamples at once, or the labels and class
probabilities (AUROC). Confusion metrics follow sklearn with ``labels=range(K), zero_division=0``: a class
neither present nor predicted has F1 0; balanced accuracy averages recall over the classes present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

CONFIDENCE_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 1000
SCREENING_SENSITIVITY = 0.90  # operating points are chosen on validation to reach this sensitivity per class
WHO_TB_TARGET = {"sensitivity": 0.90, "specificity": 0.70}  # WHO target product profile for TB screening tests


@dataclass(frozen=True)
class Metric:
    """One score. ``function`` takes confusion matrices ``(..., K, K)``, or with ``needs_probabilities``
    the labels and ``(n, K)`` probabilities of one set; ``per_class`` ones return one value per class
    (NaN where undefined). ``history`` ones are also recorded per epoch on validation (``val_<name>``);
    ``readme`` ones are columns of README's results table (every metric is in metrics.json and the model card)."""

    name: str
    label: str
    function: Callable[..., Any]
    higher_is_better: bool = True
    per_class: bool = False
    needs_probabilities: bool = False
    history: bool = False
    readme: bool = True

    def __post_init__(self) -> None:
        if self.history and self.per_class:
            raise ValueError(f"metric {self.name!r}: history.csv holds one number per metric, not one per class")


def _parts(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    confusion = confusion.astype(np.float64)
    return np.diagonal(confusion, axis1=-2, axis2=-1), confusion.sum(-1), confusion.sum(-2)


def accuracy(confusion: np.ndarray) -> np.ndarray:
    true_positives, support, _ = _parts(confusion)
    return true_positives.sum(-1) / support.sum(-1)


def recall(confusion: np.ndarray) -> np.ndarray:
    """Per-class recall (sensitivity); NaN for a class without images."""
    true_positives, support, _ = _parts(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        return true_positives / support


def macro_f1(confusion: np.ndarray) -> np.ndarray:
    true_positives, support, predicted = _parts(confusion)
    denominator = support + predicted
    return np.where(denominator > 0, 2 * true_positives / np.where(denominator > 0, denominator, 1), 0.0).mean(-1)


def balanced_accuracy(confusion: np.ndarray) -> np.ndarray:
    _, support, _ = _parts(confusion)
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(support > 0, recall(confusion), np.nan), axis=-1)


def auroc(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC per class, NaN where a class has no positive or no negative image. Computed as
    the Mann-Whitney statistic (ties count one half), which equals ``sklearn.metrics.roc_auc_score`` (a
    test checks it) and works on labels ``(..., n)`` and probabilities ``(..., n, K)`` at once, so a
    thousand bootstrap resamples take a fraction of a second instead of thousands of sklearn calls."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=np.float64)
    positive = labels[..., None] == np.arange(probabilities.shape[-1])
    from scipy.stats import rankdata  # here: cxr report reads the table without importing scipy

    ranks = rankdata(probabilities, axis=-2)
    positives = positive.sum(-2).astype(np.float64)
    negatives = labels.shape[-1] - positives
    with np.errstate(invalid="ignore", divide="ignore"):
        value = ((ranks * positive).sum(-2) - positives * (positives + 1) / 2) / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), value, np.nan)


def macro_auroc(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """The mean one-vs-rest AUROC over the classes where it is defined (NaN where none is): with every
    class present, sklearn's ``roc_auc_score(multi_class="ovr")``."""
    values = auroc(labels, probabilities)
    defined = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined, values, 0).sum(-1) / defined.sum(-1)


METRICS: tuple[Metric, ...] = (
    Metric("accuracy", "accuracy", accuracy, history=True),
    Metric("macro_f1", "macro-F1", macro_f1, history=True),
    Metric("balanced_accuracy", "balanced accuracy", balanced_accuracy),
    Metric("roc_auc_ovr", "macro AUROC", macro_auroc, needs_probabilities=True),
    Metric("recall", "recall", recall, per_class=True),
    Metric("auroc", "AUROC", auroc, per_class=True, needs_probabilities=True, readme=False),
)


def summary_metrics() -> list[Metric]:
    """The metrics with one value per set of predictions, in table order."""
    return [m for m in METRICS if not m.per_class]


def class_metrics() -> list[Metric]:
    """The metrics with one value per class, in table order."""
    return [m for m in METRICS if m.per_class]


def history_metrics() -> list[Metric]:
    """The metrics recorded per epoch on validation (``val_<name>`` in history.csv, a panel of curves.png),
    in table order."""
    return [m for m in METRICS if m.history]


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    k = num_classes
    cells = np.asarray(labels, dtype=np.int64) * k + np.asarray(predictions, dtype=np.int64)
    return np.bincount(cells, minlength=k * k).reshape(k, k)


def _plain(value: Any) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def point_scores(labels: np.ndarray, predictions: np.ndarray, classes: Sequence[str],
                 probabilities: np.ndarray | None = None) -> dict[str, Any]:
    """Every metric of the table as plain floats: ``{name: value}`` for summary metrics and
    ``{name: {class: value}}`` for per-class ones; None where undefined (a class absent, one class only).
    Metrics that need probabilities are left out without ``probabilities``."""
    labels = np.asarray(labels)
    scores: dict[str, Any] = {}
    for metric in METRICS:
        if metric.needs_probabilities and probabilities is None:
            continue
        if metric.needs_probabilities:
            value = metric.function(labels, probabilities)
        else:
            value = metric.function(confusion(labels, predictions, len(classes)))
        scores[metric.name] = ({c: _plain(v) for c, v in zip(classes, value)} if metric.per_class
                               else _plain(value))
    return scores


def _bootstrap_values(metric: Metric, labels: np.ndarray, predictions: np.ndarray,
                      probabilities: np.ndarray | None, draws: np.ndarray, k: int) -> np.ndarray:
    """The metric on every resample, ``(resamples,)`` or ``(resamples, K)``."""
    if metric.needs_probabilities:
        return metric.function(labels[draws], probabilities[draws])
    resamples = len(draws)
    cells = labels[draws] * k + predictions[draws] + (np.arange(resamples) * k * k)[:, None]
    matrices = np.bincount(cells.ravel(), minlength=resamples * k * k).reshape(resamples, k, k)
    return metric.function(matrices)


def bootstrap_ci(
    labels: np.ndarray, predictions: np.ndarray, classes: Sequence[str], probabilities: np.ndarray | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES, level: float = CONFIDENCE_LEVEL, seed: int = 0,
) -> dict[str, Any]:
    """Percentile bootstrap intervals of every metric: resample the images with replacement ``resamples``
    times (seeded, so the same inputs always give the same intervals) and take the central ``level`` share.
    ``{name: [lo, hi]}`` for summary metrics, ``{name: {class: [lo, hi]}}`` for per-class ones; a
    per-class interval uses the resamples where it is defined, and is None where it never is. Metrics
    that need probabilities are left out without ``probabilities``."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    k, n = len(classes), len(labels)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]

    def interval(values: np.ndarray) -> list[float] | None:
        values = values[~np.isnan(values)]
        return [float(v) for v in np.percentile(values, tails)] if len(values) else None

    result: dict[str, Any] = {}
    for metric in METRICS:
        if metric.needs_probabilities and probabilities is None:
            continue
        values = _bootstrap_values(metric, labels, predictions, probabilities, draws, k)
        result[metric.name] = ({c: interval(values[:, i]) for i, c in enumerate(classes)} if metric.per_class
                               else interval(values))
    return result


def operating_points(val_labels: np.ndarray, val_probabilities: np.ndarray, test_labels: np.ndarray,
                     test_probabilities: np.ndarray, classes: Sequence[str],
                     sensitivity: float = SCREENING_SENSITIVITY) -> dict[str, Any]:
    """Per class (one vs rest): the highest threshold on its probability that reaches ``sensitivity`` on
    validation, then that threshold's sensitivity and specificity on test. A threshold is chosen on
    validation only, as a screening programme would fix it before seeing new patients; None where a
    split lacks the class's positives or negatives."""
    from sklearn.metrics import roc_curve  # here: cxr report reads the table without importing sklearn

    points: dict[str, Any] = {}
    for k, name in enumerate(classes):
        val_positive = np.asarray(val_labels) == k
        if not 0 < val_positive.sum() < len(val_positive):
            points[name] = None
            continue
        false_rate, true_rate, thresholds = roc_curve(val_positive, val_probabilities[:, k],
                                                        drop_intermediate=False)
        index = int(np.argmax(true_rate >= sensitivity))
        threshold = float(min(thresholds[index], 1.0))
        positive, flagged = np.asarray(test_labels) == k, test_probabilities[:, k] >= threshold
        points[name] = {
            "threshold": threshold,
            "val_sensitivity": float(true_rate[index]),
            "val_specificity": float(1 - false_rate[index]),
            "sensitivity": float(flagged[positive].mean()) if positive.any() else None,
            "specificity": float((~flagged[~positive]).mean()) if (~positive).any() else None,
        }
    return points


def who_tb_screening(points: dict[str, Any], name: str = "TUBERCULOSIS") -> dict[str, Any] | None:
    """Whether the class's test operating point meets the WHO target for TB screening tests
    (sensitivity >= 90% and specificity >= 70%); None when the class or its test scores are missing."""
    point = points.get(name)
    if not point or point["sensitivity"] is None or point["specificity"] is None:
        return None
    meets = all(point[key] >= target for key, target in WHO_TB_TARGET.items())
    return {"class": name, "target": dict(WHO_TB_TARGET), "sensitivity": point["sensitivity"],
            "specificity": point["specificity"], "meets_target": bool(meets)}


def who_tb_sentence(check: dict[str, Any] | None) -> str:
    """One plain sentence on the WHO TB screening target, for the CLI, the model card and README."""
    if check is None:
        return "WHO TB screening target: not assessed (no tuberculosis operating point)."
    verdict = "meets" if check["meets_target"] else "does not meet"
    return (f"At the threshold fixed on validation for 90% sensitivity, {check['class']} reaches sensitivity "
            f"{check['sensitivity']:.3f} and specificity {check['specificity']:.3f} on test: it {verdict} the WHO "
            "target for TB screening tools (sensitivity >= 0.90 and specificity >= 0.70).")


def stored_value(test: dict[str, Any], metric: Metric, name: str | None = None) -> float | None:
    """A metric's point value in a ``metrics.json`` test section: ``test[name]`` for a summary metric,
    ``test["per_class"][class][name]`` for a per-class one (missing in files from before it existed)."""
    if not metric.per_class:
        return test.get(metric.name)
    return (test.get("per_class", {}).get(name) or {}).get(metric.name)


def stored_interval(test: dict[str, Any], metric: Metric, name: str | None = None) -> Sequence[float] | None:
    """A metric's bootstrap interval in a ``metrics.json`` test section, or None."""
    value: Any = (test.get("ci95") or {}).get(metric.name)
    if metric.per_class:
        value = value.get(name) if isinstance(value, dict) else None
    return value if isinstance(value, (list, tuple)) and len(value) == 2 else None
