"""model_card.md: generated from metrics.json (and external results), never typed."""

import json

import numpy as np
from scipy.special import softmax

from cxr.evaluate import metrics
from cxr.evaluate.classification_report import classification_metrics
from cxr.config import get_experiment
from cxr.data.layout import CLASSES
from cxr.report.model_card import model_card_text, write_model_card


def run_metrics(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), 120)
    logits = rng.normal(size=(120, len(CLASSES))) + 2 * np.eye(len(CLASSES))[labels]
    probabilities = softmax(logits, axis=1)
    test = classification_metrics(logits, labels, CLASSES)
    test["ci95"] = metrics.bootstrap_ci(labels, logits.argmax(1), CLASSES, probabilities, resamples=100)
    test["operating_points"] = metrics.operating_points(labels, probabilities, labels, probabilities, CLASSES)
    test["who_tb_screening"] = metrics.who_tb_screening(test["operating_points"])
    return {"experiment": "resnet50_full", "config": get_experiment("resnet50_full", epochs=3).to_dict(),
            "seed": 42, "epochs_run": 3, "best_epoch": 2, "device": "cpu", "git_commit": "abc123",
            "dataset": {"name": "cxr-sample", "val_source": "carve",
                        "counts": {"test": {c: int((labels == k).sum()) for k, c in enumerate(CLASSES)}}},
            "test": test}


def test_card_states_use_data_recipe_and_every_metric_with_its_interval():
    run = run_metrics()
    card = model_card_text(run)
    assert "Not for diagnosis" in card and "paediatric" in card and "the class is also the source" in card
    assert "| epochs | `3` |" in card and "| lr |" in card  # the recipe comes from the configuration
    test = run["test"]
    low, high = test["ci95"]["roc_auc_ovr"]
    assert f"| macro AUROC | {test['roc_auc_ovr']:.3f} ({low:.3f}-{high:.3f}) |" in card
    assert f"{test['per_class']['NORMAL']['auroc']:.3f}" in card
    assert metrics.who_tb_sentence(test["who_tb_screening"]) in card
    assert card.count("Not computed for this run.") == 2  # no shortcut results in this run
    assert "No external validation yet" in card and "was not measured for this run" in card


def test_card_shows_the_shortcut_checks_and_external_results_it_finds(tmp_path):
    run = {**run_metrics(), "shortcut_baseline": {"test": {"accuracy": 0.849, "macro_f1": 0.846}},
           "shortcuts": {"sentence": "with the lungs hidden, macro-F1 falls from 0.83 to 0.61"}}
    (tmp_path / "metrics.json").write_text(json.dumps(run))
    external = {**run_metrics(seed=1), "external": {"folder": "elsewhere"},
                "overlaps": {"warning": "3 of 120 external images also appear in the checkpoint's training data"}}
    external["test"].update(images=120, classes_present=list(CLASSES))
    external["test_without_overlaps"] = None
    (tmp_path / "external" / "elsewhere").mkdir(parents=True)
    (tmp_path / "external" / "elsewhere" / "metrics.json").write_text(json.dumps(external))
    card = write_model_card(tmp_path).read_text()
    assert "accuracy: 0.849" in card and "with the lungs hidden, macro-F1 falls from 0.83 to 0.61" in card
    assert "### `elsewhere` (120 images" in card and "**3 of 120 external images" in card
    assert "Not computed for this run." not in card and "was not measured" not in card


def test_card_names_the_same_source_pair_groups_and_absent_class_shares(tmp_path):
    run = run_metrics()
    run["test"]["pairwise_auroc"] = {"COVID19 vs NORMAL": {"auroc": 0.99, "ci95": [0.98, 1.0], "images": 90,
                                                           "same_source": False},
                                     "NORMAL vs PNEUMONIA": {"auroc": 0.91, "ci95": [0.88, 0.94], "images": 120,
                                                             "same_source": True}}
    run["test"]["groups"] = {"column": "source_repo", "minimum_images": 10,
                             "groups": {"kermany": {"images": 50, "accuracy": 0.9, "macro_f1": 0.6,
                                                    "ci95": {"accuracy": [0.8, 0.96], "macro_f1": [0.5, 0.7]}}},
                             "too_small": {"tiny": {"images": 3, "counts": {"COVID19": 3}}},
                             "sentence": "By source_repo, accuracy ranges from 0.90 (kermany, 50 images)."}
    (tmp_path / "metrics.json").write_text(json.dumps(run))
    external = {**run_metrics(seed=1), "external": {"folder": "nih-adult"},
                "overlaps": {"warning": None, "audited": False, "note": "--data-dir is needed for the overlap audit"},
                "shortcut_baseline": {"test": {"accuracy": 0.02, "macro_f1": 0.01}}}
    external["test"].update(images=300, classes_present=["NORMAL", "PNEUMONIA"],
                            class_shares={"sentence": "134 of 300 images (45%) were called a class this folder "
                                                      "does not hold (COVID19, TUBERCULOSIS): ..."})
    (tmp_path / "external" / "nih-adult").mkdir(parents=True)
    (tmp_path / "external" / "nih-adult" / "metrics.json").write_text(json.dumps(external))
    card = write_model_card(tmp_path).read_text()
    assert "| NORMAL vs PNEUMONIA (the same source: Kermany children) | 0.910 (0.880-0.940) | 120 |" in card
    assert "| COVID19 vs NORMAL | 0.990 (0.980-1.000) | 90 |" in card
    assert "the one score here that the source cannot explain" in card
    assert "| kermany | 50 | 0.900 (0.800-0.960) | 0.600 (0.500-0.700) |" in card
    assert "| tiny | 3 | too small to score |  |" in card and "By source_repo, accuracy ranges" in card
    assert "134 of 300 images (45%) were called a class this folder does not hold" in card
    assert "Overlap not audited: --data-dir is needed for the overlap audit" in card
    assert "The no-anatomy baseline, fit on the training split, scores accuracy 0.020" in card
