"""Inference stands apart from training: loading a trained model, predicting, exporting and serving
import nothing of the training loop."""

from __future__ import annotations

import json
import subprocess
import sys

TRAINING = {"cxr.train.engine", "cxr.workflow", "cxr.train.optim", "cxr.train.losses", "cxr.train.features", "cxr.train.graphs", "cxr.train.pipeline",
            "cxr.train.tensorboard_log", "cxr.audit.data_audit"}


def test_predict_export_and_serve_import_no_training_module():
    code = ("import json, sys; import cxr.inference.predict, cxr.inference.export, cxr.inference.serve; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('cxr'))))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout))
    assert {"cxr.inference.predict", "cxr.inference.export", "cxr.inference.serve", "cxr.inference.trained_model", "cxr.models.classifier"} <= loaded  # the check sees imports
    assert not TRAINING & loaded, f"inference imports {sorted(TRAINING & loaded)}"
