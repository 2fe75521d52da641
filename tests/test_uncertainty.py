import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

from cxr.evaluate import uncertainty
from cxr.cli import main
from cxr.report.compare import plot_comparison
from cxr.config import get_experiment
from cxr.data.dataset import XRayDataset, load_splits
from cxr.data.layout import CLASSES
from cxr.data.imageio import decode_image
from cxr.evaluate.metrics import bootstrap_ci, point_scores
from cxr.train.pipeline import make_loader
from cxr.models.classifier import build_model, preprocessing
from cxr.data.preprocessing import Preprocessing
from cxr.workflow import evaluate_model
from cxr.common.runtime import Runtime

CPU = Runtime.create("cpu", progress=False)


def noisy_predictions(n: int = 300, accuracy: float = 0.7, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    predictions = np.where(rng.random(n) < accuracy, labels, rng.integers(0, len(CLASSES), n))
    return labels, predictions


def test_point_scores_match_sklearn():
    labels, predictions = noisy_predictions()
    scores = point_scores(labels, predictions, CLASSES)
    assert scores["accuracy"] == pytest.approx((labels == predictions).mean())
    assert scores["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    recalls = recall_score(labels, predictions, average=None)
    assert [scores["recall"][c] for c in CLASSES] == pytest.approx(list(recalls))


def test_bootstrap_intervals_contain_point_estimate_and_are_seeded():
    labels, predictions = noisy_predictions()
    point = point_scores(labels, predictions, CLASSES)
    first = bootstrap_ci(labels, predictions, CLASSES, seed=7)
    assert first == bootstrap_ci(labels, predictions, CLASSES, seed=7)
    assert first != bootstrap_ci(labels, predictions, CLASSES, seed=8)
    for key in ("accuracy", "macro_f1", "balanced_accuracy"):
        low, high = first[key]
        assert low < point[key] < high
        assert high - low < 0.25
    for name in CLASSES:
        low, high = first["recall"][name]
        assert low <= point["recall"][name] <= high


def test_bootstrap_width_shrinks_with_more_images():
    small = bootstrap_ci(*noisy_predictions(n=100), CLASSES)["accuracy"]
    large = bootstrap_ci(*noisy_predictions(n=2000), CLASSES)["accuracy"]
    assert large[1] - large[0] < small[1] - small[0]


def test_ece_on_a_case_computed_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.7 (right), 0.65 (right) fall into three of 15 bins:
    # (2/4)*|0.5-0.9| + (1/4)*|1-0.7| + (1/4)*|1-0.65| = 0.2 + 0.075 + 0.0875
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.65, 0.35]])
    labels = np.array([0, 1, 1, 0])
    assert uncertainty.expected_calibration_error(probabilities, labels, bins=15) == pytest.approx(0.3625)
    table = uncertainty.calibration_bins(probabilities, labels, bins=15)
    assert table["count"].sum() == 4 and table["count"][13] == 2


def test_ece_is_zero_when_confidence_matches_accuracy():
    probabilities = np.array([[1.0, 0.0]] * 5)
    assert uncertainty.expected_calibration_error(probabilities, np.zeros(5, dtype=int)) == 0.0
    assert uncertainty.expected_calibration_error(probabilities, np.ones(5, dtype=int)) == 1.0


def test_reliability_diagram_is_written(tmp_path):
    labels, predictions = noisy_predictions(n=50)
    logits = np.eye(len(CLASSES))[predictions] * 2.0
    ece = uncertainty.calibration_report(logits, labels, tmp_path / "reliability.png", "test")
    assert 0 <= ece <= 1
    assert Image.open(tmp_path / "reliability.png").size[0] > 100


def test_tau_is_chosen_on_validation_to_recover_a_rare_class():
    # prior 0.9 / 0.1; the rare class loses by a margin of 0.5, the common class wins by 2.
    # Subtracting tau*log(prior) moves the margin by tau*log(9) = 2.197*tau: tau 0.3 to 0.9 get
    # everything right, and the weakest of them wins the tie.
    prior = np.array([0.9, 0.1])
    val_logits = np.array([[2.0, 0.0]] * 9 + [[0.5, 0.0]] * 3)
    val_labels = np.array([0] * 9 + [1] * 3)
    tau, scores = uncertainty.choose_tau(val_logits, val_labels, prior, ["common", "rare"])
    assert tau == pytest.approx(0.3)
    assert scores[tau] == 1.0 and scores[0.0] < 1.0
    np.testing.assert_array_equal(uncertainty.adjust_logits(val_logits, prior, 0.0), val_logits)


def test_logit_adjustment_report_never_uses_test_labels_for_tau():
    rng = np.random.default_rng(0)
    val_logits, val_labels = rng.normal(size=(40, 4)), rng.integers(0, 4, 40)
    test_logits = rng.normal(size=(30, 4))
    train_labels = [0] * 10 + [1] * 20 + [2] * 30 + [3] * 40
    reports = [uncertainty.logit_adjustment_report(val_logits, val_labels, test_logits, rng.integers(0, 4, 30),
                                                   train_labels, CLASSES) for _ in range(2)]
    assert reports[0]["tau"] == reports[1]["tau"]
    assert reports[0]["train_prior"]["TUBERCULOSIS"] == pytest.approx(0.4)
    assert reports[0]["val_macro_f1"]["with"] >= reports[0]["val_macro_f1"]["without"]


def test_tta_views_are_the_evaluation_crop_its_mirror_and_mild_changes(synthetic_root):
    torch.manual_seed(0)
    model = build_model("resnet50", weights="none", trainable_blocks=0, image_size=32).eval()
    prep = preprocessing("resnet50", 32)
    with pytest.warns(UserWarning, match="Skipped"):
        test_split = load_splits(synthetic_root).test.subset([0, 5, 10])
    recipe = Preprocessing.from_dict(prep)
    side = recipe.square_side
    squares = torch.from_numpy(np.stack([decode_image(p, side) for p in test_split.paths]))[:, None]
    views = uncertainty.TTAViews.from_preprocessing(prep)(squares)
    assert views.shape == (3, 8, 3, 32, 32)
    torch.testing.assert_close(views[:, 0], recipe.transform()(squares))  # view 0: plain evaluation
    torch.testing.assert_close(views[:, 4:], views[:, :4].flip(-1))  # the other half: their mirror images
    dataset = XRayDataset(test_split, uncertainty.TTAViews.from_preprocessing(prep), side)
    log_probs, labels = uncertainty.predict_tta(model, make_loader(dataset, 2, False, CPU), CPU)
    assert log_probs.shape == (3, len(CLASSES)) and list(labels) == test_split.labels
    with torch.no_grad():
        expected = model(views[0]).softmax(1).mean(0).numpy()
    np.testing.assert_allclose(np.exp(log_probs[0]), expected, rtol=1e-4, atol=1e-6)


def test_evaluate_model_reports_intervals_calibration_adjustment_tta_and_cam(synthetic_root, tmp_path):
    torch.manual_seed(0)
    experiment = get_experiment("resnet50_full", epochs=1, batch_size=8, image_size=32, weights="none")
    model = build_model("resnet50", weights="none", image_size=32)
    with pytest.warns(UserWarning, match="Skipped"):
        splits = load_splits(synthetic_root)
    splits.test = splits.test.subset(range(0, len(splits.test), 3))
    metrics = evaluate_model(model, experiment, splits, tmp_path, CPU, preprocessing("resnet50", 32), tta=True)
    low, high = metrics["ci95"]["accuracy"]
    assert low <= metrics["accuracy"] <= high
    assert set(metrics["ci95"]["recall"]) == set(CLASSES)
    assert 0 <= metrics["ece"] <= 1
    adjusted = metrics["logit_adjusted"]
    assert adjusted["without"]["accuracy"] == pytest.approx(metrics["accuracy"])
    assert set(adjusted["with"]) >= {"accuracy", "macro_f1", "balanced_accuracy", "recall", "ci95"}
    assert 0 <= metrics["tta"]["accuracy"] <= 1 and "ci95" in metrics["tta"]
    assert (tmp_path / "reliability.png").is_file() and (tmp_path / "cam.png").is_file()
    report = json.loads((tmp_path / "classification_report.json").read_text())
    assert report["ci95"] == metrics["ci95"]


def fake_metrics(name: str, accuracy: float) -> dict:
    recall = {c: accuracy for c in CLASSES}
    return {"experiment": name, "test": {
        "accuracy": accuracy, "macro_f1": accuracy - 0.05, "balanced_accuracy": accuracy,
        "per_class": {c: {"recall": r} for c, r in recall.items()},
        "ci95": {"accuracy": [accuracy - 0.04, accuracy + 0.04], "macro_f1": [accuracy - 0.1, accuracy],
                 "balanced_accuracy": [accuracy - 0.05, accuracy + 0.03],
                 "recall": {c: [r - 0.1, min(1.0, r + 0.1)] for c, r in recall.items()}},
    }}


def test_compare_figure_from_metrics_files(tmp_path, capsys):
    for name, accuracy in (("resnet50_full", 0.85), ("vit_b16_head", 0.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(fake_metrics(name, accuracy)))
    figure = plot_comparison(sorted(tmp_path.glob("*/metrics.json")))
    axis = figure.axes[0]
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["resnet50_full", "vit_b16_head"]
    assert len(axis.get_xticklabels()) == 3 + len(CLASSES)
    assert main(["compare", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "comparison.png").is_file()
    assert main(["compare", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
