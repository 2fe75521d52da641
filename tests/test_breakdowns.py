"""Scores broken down by pair of classes, by true class (absent classes included) and by group."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr.evaluate import breakdowns
from cxr.data.layout import CLASSES


def _probabilities(labels: np.ndarray, seed: int = 0, signal: float = 1.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (len(labels), len(CLASSES)))
    logits[np.arange(len(labels)), labels] += signal
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def test_pairwise_auroc_is_sklearns_one_vs_one_pair_score():
    labels = np.repeat(np.arange(4), 25)
    probabilities = _probabilities(labels)
    pairs = breakdowns.pairwise_auroc(labels, probabilities, CLASSES)
    assert len(pairs) == 6 and pairs["NORMAL vs PNEUMONIA"]["same_source"]
    assert not pairs["COVID19 vs TUBERCULOSIS"]["same_source"]
    for a in range(4):
        for b in range(a + 1, 4):
            chosen = (labels == a) | (labels == b)
            expected = np.mean([roc_auc_score(labels[chosen] == a, probabilities[chosen, a]),
                                roc_auc_score(labels[chosen] == b, probabilities[chosen, b])])
            entry = pairs[f"{CLASSES[a]} vs {CLASSES[b]}"]
            assert entry["auroc"] == pytest.approx(expected) and entry["images"] == 50
            assert entry["ci95"][0] <= entry["auroc"] <= entry["ci95"][1]


def test_pairs_with_an_absent_class_are_undefined():
    labels = np.repeat([1, 2], 20)
    pairs = breakdowns.pairwise_auroc(labels, _probabilities(labels), CLASSES)
    assert pairs["NORMAL vs PNEUMONIA"]["auroc"] is not None
    assert pairs["COVID19 vs NORMAL"]["auroc"] is None and pairs["COVID19 vs NORMAL"]["images"] == 20
    assert "the one score here that the source cannot explain" in breakdowns.same_source_sentence(pairs)
    one = np.ones(10, dtype=int)
    single = breakdowns.pairwise_auroc(one, _probabilities(one), CLASSES)
    assert all(entry["auroc"] is None for entry in single.values())
    assert "AUROC is undefined here (only one of the two is present)" in breakdowns.same_source_sentence(single)


def test_shares_name_the_absent_classes_images_were_sent_to():
    labels = np.array([1] * 10 + [2] * 10)
    predictions = np.array([3] * 6 + [0] * 3 + [1] + [2] * 10)
    shares = breakdowns.prediction_shares(labels, predictions, CLASSES)
    assert set(shares) == {"NORMAL", "PNEUMONIA"}
    assert shares["NORMAL"]["predicted"] == {"COVID19": 0.3, "NORMAL": 0.1, "PNEUMONIA": 0.0, "TUBERCULOSIS": 0.6}
    sentence = breakdowns.shares_sentence(shares, ["COVID19", "TUBERCULOSIS"])
    assert sentence.startswith("9 of 20 images (45%) were called a class this folder does not hold")
    assert "of the 10 NORMAL images, 60% TUBERCULOSIS (absent here), 30% COVID19 (absent here), 10% NORMAL" in sentence
    assert breakdowns.shares_sentence(shares, []) is None


def test_subgroups_are_scored_with_intervals_and_small_ones_named():
    labels = np.repeat(np.arange(4), 12)
    groups = np.array(["big"] * 30 + ["other"] * 12 + ["tiny"] * 6)
    report = breakdowns.subgroup_scores(labels, _probabilities(labels), groups, CLASSES)
    assert set(report["groups"]) == {"big", "other"} and report["too_small"] == {
        "tiny": {"images": 6, "counts": {"TUBERCULOSIS": 6}}}
    big = report["groups"]["big"]
    assert big["images"] == 30 and big["counts"] == {"COVID19": 12, "NORMAL": 12, "PNEUMONIA": 6}
    assert big["ci95"]["accuracy"][0] <= big["accuracy"] <= big["ci95"]["accuracy"][1]
    sentence = breakdowns.subgroup_sentence(report, "source_repo")
    assert sentence.startswith("By source_repo, accuracy ranges from") and "over 2 groups" in sentence
    assert sentence.endswith("1 group under 10 images is too small to score (tiny).")
