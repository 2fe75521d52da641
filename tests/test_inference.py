"""Inference stands apart from training: loading a trained model, predicting, exporting and serving
import nothing of the training loop."""

from __future__ import annotations

import json
import subprocess
import sys

TRAINING = {"cxr.engine", "cxr.workflow", "cxr.optim", "cxr.losses", "cxr.features", "cxr.graphs", "cxr.pipeline",
            "cxr.tensorboard_log", "cxr.audit"}


def test_predict_export_and_serve_import_no_training_module():
    code = ("import json, sys; import cxr.predict, cxr.export, cxr.serve; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('cxr'))))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout))
    assert {"cxr.predict", "cxr.export", "cxr.serve", "cxr.inference", "cxr.models"} <= loaded  # the check sees imports
    assert not TRAINING & loaded, f"inference imports {sorted(TRAINING & loaded)}"
