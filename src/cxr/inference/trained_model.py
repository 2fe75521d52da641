"""Loading a trained classifier for inference: what predict, export and serve stand on. Nothing here
imports the training loop (:mod:`cxr.train.engine`), so classifying one image never loads it."""

from __future__ import annotations

import os
from typing import Any

import torch

from cxr.models.checkpoint import CheckpointError, load_checkpoint
from cxr.config import Experiment, experiment_from_dict
from cxr.data.layout import CLASSES
from cxr.models.backbones import BACKBONES
from cxr.models.classifier import Classifier, build_model


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


# Beyond this an activation is not a trained network's (theirs stay below about 1e4): an image a little
# brighter or darker than the probes would overflow float32 (3.4e38) there.
ACTIVATION_LIMIT = 1e20


class NonFiniteOutputError(ValueError):
    """The model's output for a given image is NaN or infinite: no class can be read from it."""


def probe_images(image_size: int) -> tuple[list[str], torch.Tensor]:
    """Normalised inputs of both signs: a random image and its negative (every pixel's sign flipped), and a
    uniformly dark and a uniformly bright image (a normalised pixel lies within about -2.1..2.6). A probe of
    one sign hides a channel that overflows only for the other (``torch.rand`` is never negative)."""
    noise = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    names = ["a random image", "the negated random image", "a dark uniform image", "a bright uniform image"]
    return names, torch.cat([noise, -noise, torch.full_like(noise, -2.5), torch.full_like(noise, 2.5)])


def _overflowing_module(model: Classifier, probes: torch.Tensor) -> tuple[str, int] | None:
    """The first module (and probe) whose output is not finite or beyond :data:`ACTIVATION_LIMIT`, or None."""
    found: list[tuple[str, int]] = []

    def watch(name: str):
        def hook(module, inputs, output) -> None:
            for tensor in output if isinstance(output, (tuple, list)) else (output,):
                if found or not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
                    continue
                if not bool(tensor.abs().amax() <= ACTIVATION_LIMIT) and tensor.shape[:1] == probes.shape[:1]:
                    peaks = tensor.abs().flatten(1).amax(1)  # NaN fails every comparison: it counts as too large
                    found.append((name, int((~(peaks <= ACTIVATION_LIMIT)).nonzero()[0])))
        return hook

    # The layers themselves (containers only pass their last layer's output on): one reduction per output.
    handles = [module.register_forward_hook(watch(name)) for name, module in model.named_modules()
               if name and not any(module.children())]
    try:
        logits = model(probes)
    finally:
        for handle in handles:
            handle.remove()
    if not found and not bool(torch.isfinite(logits).all()):
        found.append(("output", int((~torch.isfinite(logits)).any(1).nonzero()[0])))
    return found[0] if found else None


@torch.inference_mode()
def check_finite_outputs(model: Classifier, image_size: int, source: str | os.PathLike) -> None:
    """Refuse a model whose outputs or inner activations for the probe images (:func:`probe_images`) are not
    finite or beyond :data:`ACTIVATION_LIMIT` (weights so large they overflow, even where each is finite):
    it would print NaN probabilities and exit 0."""
    names, probes = probe_images(image_size)
    found = _overflowing_module(model.eval(), probes)
    if found is not None:
        module, probe = found
        raise CheckpointError(f"{str(source)!r} gives non-finite outputs (NaN or infinity, or activations beyond "
                              f"{ACTIVATION_LIMIT:.0e} in {module!r}) for {names[probe]}; it cannot predict "
                              "anything. Use an earlier checkpoint.")


def check_finite_rows(values: Any, names: Any) -> None:
    """Refuse model outputs (one row per image) with NaN or infinity, naming the first such image: its argmax
    would be the first class, printed as a prediction with empty probabilities."""
    import numpy as np

    bad = np.flatnonzero(~np.isfinite(np.asarray(values, dtype=np.float64)).all(axis=1))
    if bad.size:
        raise NonFiniteOutputError(
            f"{names[bad[0]]}: the model's output is not finite (NaN or infinity) for this image"
            f"{f' and {bad.size - 1} other(s)' if bad.size > 1 else ''}; its weights overflow on it, so none of "
            "its predictions can be trusted. Use an earlier checkpoint.")
