"""The one table of metrics (cxr.evaluate.metrics) and every consumer that reads it."""

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from cxr.report import compare
from cxr.train import engine
from cxr.evaluate import metrics
from cxr import notebook
from cxr.report import readme as report
from cxr.train import tensorboard_log
from cxr.evaluate.classification_report import classification_metrics
from cxr.cli import _print_metrics
from cxr.evaluate.figures import plot_history, plot_roc
from cxr.data.layout import CLASSES


def predictions(n: int = 300, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Labels and logits that carry some signal, rounded so probabilities tie (AUROC must count ties as 1/2)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    logits = np.round(rng.normal(size=(n, len(CLASSES))) + 1.5 * np.eye(len(CLASSES))[labels], 1)
    return labels, logits


def test_table_scores_equal_sklearn():
    labels, logits = predictions()
    probabilities = softmax(logits, axis=1)
    scores = metrics.point_scores(labels, logits.argmax(1), CLASSES, probabilities)
    assert scores["macro_f1"] == f1_score(labels, logits.argmax(1), average="macro")
    assert scores["balanced_accuracy"] == balanced_accuracy_score(labels, logits.argmax(1))
    assert scores["roc_auc_ovr"] == pytest.approx(roc_auc_score(labels, probabilities, multi_class="ovr"), abs=1e-12)
    expected = [roc_auc_score(labels == k, probabilities[:, k]) for k in range(len(CLASSES))]
    assert [scores["auroc"][c] for c in CLASSES] == pytest.approx(expected, abs=1e-12)


def test_validation_summary_is_unchanged_from_sklearn():
    """history.csv's val_accuracy and val_macro_f1 come from the table; they must equal the sklearn values
    the epoch summary used before, bit for bit."""
    labels, logits = predictions(n=97, seed=3)
    summary = engine.summarize(logits.astype(np.float32), labels, torch.nn.CrossEntropyLoss())
    predicted = logits.argmax(1)
    assert summary["accuracy"] == float((predicted == labels).mean())
    assert summary["macro_f1"] == float(f1_score(labels, predicted, average="macro", labels=range(4), zero_division=0))
    assert summary["balanced_accuracy"] == float(balanced_accuracy_score(labels, predicted))
    assert set(summary) == {"accuracy", "macro_f1", "balanced_accuracy", "loss"}


def test_auroc_is_undefined_not_a_crash_when_one_class_is_present():
    labels = np.full(20, 3)
    probabilities = softmax(np.random.default_rng(0).normal(size=(20, 4)), axis=1)
    scores = metrics.point_scores(labels, probabilities.argmax(1), CLASSES, probabilities)
    assert scores["roc_auc_ovr"] is None
    assert set(scores["auroc"].values()) == {None}
    intervals = metrics.bootstrap_ci(labels, probabilities.argmax(1), CLASSES, probabilities, resamples=50)
    assert intervals["roc_auc_ovr"] is None and set(intervals["auroc"].values()) == {None}
    result = classification_metrics(np.log(probabilities), labels, CLASSES)
    assert result["roc_auc_ovr"] is None and result["per_class"]["TUBERCULOSIS"]["auroc"] is None


def test_macro_auroc_averages_the_classes_present():
    labels, logits = predictions()
    present = labels != 0  # no COVID19 image: its AUROC is undefined, the others are not
    probabilities = softmax(logits[present], axis=1)
    scores = metrics.point_scores(labels[present], probabilities.argmax(1), CLASSES, probabilities)
    assert scores["auroc"]["COVID19"] is None
    defined = [scores["auroc"][c] for c in CLASSES[1:]]
    assert scores["roc_auc_ovr"] == pytest.approx(np.mean(defined))


def test_bootstrap_covers_auroc_and_keeps_the_old_intervals():
    labels, logits = predictions()
    probabilities = softmax(logits, axis=1)
    hard = metrics.bootstrap_ci(labels, logits.argmax(1), CLASSES, seed=4)
    full = metrics.bootstrap_ci(labels, logits.argmax(1), CLASSES, probabilities, seed=4)
    assert "roc_auc_ovr" not in hard and {k: full[k] for k in hard} == hard  # same resamples, same intervals
    point = metrics.point_scores(labels, logits.argmax(1), CLASSES, probabilities)
    low, high = full["roc_auc_ovr"]
    assert low < point["roc_auc_ovr"] < high and high - low < 0.1
    for name in CLASSES:
        assert full["auroc"][name][0] < point["auroc"][name] < full["auroc"][name][1]


def test_operating_point_is_fixed_on_validation_and_measured_on_test():
    # validation: 10 positives of class 0 with scores 0.1..1.0; 90% sensitivity needs threshold 0.2
    val_labels = np.array([0] * 10 + [1] * 10)
    val_scores = np.concatenate([np.linspace(0.1, 1.0, 10), np.linspace(0.0, 0.45, 10)])
    val_probabilities = np.stack([val_scores, 1 - val_scores], axis=1)
    test_labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    test_scores = np.array([0.9, 0.5, 0.25, 0.1, 0.15, 0.3, 0.05, 0.19])
    test_probabilities = np.stack([test_scores, 1 - test_scores], axis=1)
    points = metrics.operating_points(val_labels, val_probabilities, test_labels, test_probabilities, ["A", "B"])
    assert points["A"]["threshold"] == pytest.approx(0.2)
    assert points["A"]["val_sensitivity"] == pytest.approx(0.9)
    assert points["A"]["sensitivity"] == pytest.approx(0.75)  # 0.9, 0.5, 0.25 of four reach 0.2
    assert points["A"]["specificity"] == pytest.approx(0.75)  # only 0.3 of the negatives does


def test_who_tb_target_needs_both_sensitivity_and_specificity():
    meets = metrics.who_tb_screening({"TUBERCULOSIS": {"sensitivity": 0.92, "specificity": 0.71}})
    fails = metrics.who_tb_screening({"TUBERCULOSIS": {"sensitivity": 0.95, "specificity": 0.69}})
    assert meets["meets_target"] and not fails["meets_target"]
    assert "does not meet" in metrics.who_tb_sentence(fails) and " meets" in metrics.who_tb_sentence(meets)
    assert metrics.who_tb_screening({"TUBERCULOSIS": None}) is None


def test_roc_figure_marks_an_undefined_class(tmp_path):
    labels, logits = predictions()
    labels[labels == 2] = 1  # no PNEUMONIA left
    figure = plot_roc(labels, softmax(logits, axis=1), CLASSES, tmp_path / "roc.png")
    texts = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert any("PNEUMONIA: AUROC undefined" in t for t in texts)
    assert any(t.startswith("TUBERCULOSIS: AUROC 0.") for t in texts)
    assert (tmp_path / "roc.png").stat().st_size > 0


def run_metrics(labels: np.ndarray, logits: np.ndarray) -> dict:
    test = classification_metrics(logits, labels, CLASSES)
    test["ci95"] = metrics.bootstrap_ci(labels, logits.argmax(1), CLASSES, softmax(logits, axis=1), resamples=50)
    return {"experiment": "demo", "test": test, "dataset": {"name": "synthetic", "counts": {"test": {"A": 1}}},
            "weights": "none", "epochs_run": 1, "best_epoch": 1, "train_seconds": 1.0, "device": "cpu",
            "mixed_precision": "fp32", "best_val": {"val_macro_f1": 0.5}, "_path": "x/demo/metrics.json"}


def test_adding_a_metric_is_one_entry(monkeypatch, capsys):
    """A new table entry reaches the test evaluation, the intervals, TensorBoard, README, the comparison
    figure, the CLI summary and the notebooks' conclusion without touching any of them."""
    error_rate = metrics.Metric("error_rate", "error rate", lambda c: 1 - metrics.accuracy(c), higher_is_better=False)
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, error_rate))
    labels, logits = predictions()
    run = run_metrics(labels, logits)
    expected = 1 - float((logits.argmax(1) == labels).mean())
    assert run["test"]["error_rate"] == pytest.approx(expected)
    assert run["test"]["ci95"]["error_rate"][0] < expected < run["test"]["ci95"]["error_rate"][1]
    assert tensorboard_log.test_scalars(run["test"])["test/error_rate"] == pytest.approx(expected)
    assert "error rate" in report.scores_table([run]).splitlines()[0]
    assert "error\nrate" in compare.metric_table(run)
    _print_metrics(run, "out", "demo")
    assert f"error rate {expected:.3f}" in capsys.readouterr().out
    assert "error rate **" in notebook.conclusion_text(run)


def test_a_history_metric_that_needs_probabilities_reaches_history_and_curves(monkeypatch):
    """A metric marked for history is a column of history.csv and a panel of curves.png, whether it reads
    hard predictions or probabilities."""
    import matplotlib.pyplot as plt

    auroc_history = metrics.Metric("auroc_demo", "AUROC per epoch", metrics.macro_auroc,
                                   needs_probabilities=True, history=True)
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, auroc_history))
    labels, logits = predictions(n=97, seed=5)
    summary = engine.summarize(logits.astype(np.float32), labels, torch.nn.CrossEntropyLoss())
    expected = roc_auc_score(labels, softmax(logits.astype(np.float32).astype(np.float64), axis=1), multi_class="ovr")
    assert summary["auroc_demo"] == pytest.approx(expected, abs=1e-12)
    row = engine.history_row(0, {"loss": 1.0, "accuracy": 0.5}, summary, 1e-3, 2.0)
    assert list(row) == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1",
                         "val_auroc_demo", "lr", "seconds"]
    figure = plot_history([row, {**row, "epoch": 2}])
    assert [axis.get_title() for axis in figure.axes] == ["Loss", "Accuracy", "Macro-F1", "AUROC per epoch"]
    plt.close(figure)


def test_a_metric_per_class_cannot_go_into_the_history():
    with pytest.raises(ValueError, match="one number per metric, not one per class"):
        metrics.Metric("recall_history", "recall", metrics.recall, per_class=True, history=True)
