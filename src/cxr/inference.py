"""Loading a trained classifier for inference: what predict, export and serve stand on. Nothing here
imports the training loop (:mod:`cxr.engine`), so classifying one image never loads it."""

from __future__ import annotations

import os
from typing import Any

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .config import Experiment, experiment_from_dict
from .data import CLASSES
from .backbones import BACKBONES
from .models import Classifier, build_model


def load_trained_model(checkpoint: str | os.PathLike, experiment: str | None = None) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild a trained classifier from a checkpoint (refusing one of another experiment, or one whose
    weights do not fit or give non-finite outputs), in eval mode. Checkpoints from before
    ``trainable_blocks`` (with ``freeze_backbone``) load too."""
    state = load_checkpoint(checkpoint, experiment=experiment, classes=CLASSES)
    config = checkpoint_experiment(state, checkpoint)
    model = build_model(config.arch, len(state["classes"]), "none", config.trainable_blocks, config.image_size)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{str(checkpoint)!r} holds weights that do not fit its {config.arch} model with "
                              f"{len(state['classes'])} classes ({state_dict_mismatch(error)}).") from None
    check_finite_outputs(model, config.image_size, checkpoint)
    return model.eval(), state


def checkpoint_experiment(state: dict[str, Any], checkpoint: str | os.PathLike) -> Experiment:
    """The experiment a checkpoint was trained with; a clear error when its settings are incomplete."""
    try:
        config = experiment_from_dict(state["experiment"])
    except TypeError as error:  # a required field (name, arch) is missing
        raise CheckpointError(f"{str(checkpoint)!r} has incomplete experiment settings ({error}).") from None
    if config.arch not in BACKBONES:
        raise CheckpointError(f"{str(checkpoint)!r} names an unknown architecture {config.arch!r}.")
    return config


def state_dict_mismatch(error: RuntimeError) -> str:
    """The first two lines of torch's load_state_dict error after its header: which tensors are missing,
    unexpected or of another shape (the header alone, "Error(s) in loading state_dict", says nothing)."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    return "; ".join(line[:300] for line in lines[:2]) or str(error)


@torch.inference_mode()
def check_finite_outputs(model: Classifier, image_size: int, source: str | os.PathLike) -> None:
    """Refuse a model whose output for a fixed random image is not finite (weights so large they overflow,
    even where each is finite): it would print NaN probabilities and exit 0. Not a blank image: a network
    maps one to zero features, which hide any weight."""
    probe = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    logits = model.eval()(probe)
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointError(f"{str(source)!r} gives non-finite outputs (NaN or infinity) for a test image; "
                              "it cannot predict anything. Use an earlier checkpoint.")
