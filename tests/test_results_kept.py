"""Committed results are never replaced by surprise: a run says what it is about to replace."""

from __future__ import annotations

import json

from cxr.config import get_experiment
from cxr.workflow import results_replaced


def test_a_run_names_the_results_it_replaces(tmp_path):
    experiment = get_experiment("vit_b16_head", epochs=1, weights="none")
    folder = tmp_path / "vit_b16_head"
    assert results_replaced(folder, experiment, "cpu") is None  # nothing there yet
    folder.mkdir()
    full_budget = {"config": get_experiment("vit_b16_head", weights="none").to_dict(), "device": "NVIDIA H100 80GB HBM3",
                   "epochs_run": 13, "weights": "none", "date": "2026-11-25T10:00:00+00:00"}
    (folder / "metrics.json").write_text(json.dumps(full_budget))
    message = results_replaced(folder, experiment, "cpu")
    assert "NVIDIA H100 80GB HBM3, 13 of 20 epochs, weights none, 2026-11-25" in message
    assert "another configuration or device" in message and "--out DIR" in message
    (folder / "metrics.json").write_text(json.dumps({**full_budget, "config": experiment.to_dict(), "device": "cpu"}))
    assert "the same configuration and device" in results_replaced(folder, experiment, "cpu")
    (folder / "metrics.json").write_text("{broken")
    assert "unreadable metrics.json" in results_replaced(folder, experiment, "cpu")
