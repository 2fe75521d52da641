"""Loading a trained classifier for inference: what predict, export and serve stand on. Nothing here
imports the training loop (:mod:`cxr.engine`), so classifying one image never loads it."""

from __future__ import annotations

import os
from typing import Any

from .checkpoint import load_checkpoint
from .config import experiment_from_dict
from .data import CLASSES
from .models import Classifier, build_model


def load_trained_model(checkpoint: str | os.PathLike, experiment: str | None = None) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild a trained classifier from a checkpoint (refusing one of another experiment), in eval mode.
    Checkpoints from before ``trainable_blocks`` (with ``freeze_backbone``) load too."""
    state = load_checkpoint(checkpoint, experiment=experiment, classes=CLASSES)
    config = experiment_from_dict(state["experiment"])
    model = build_model(config.arch, len(state["classes"]), "none", config.trainable_blocks, config.image_size)
    model.load_state_dict(state["model"])
    return model.eval(), state
