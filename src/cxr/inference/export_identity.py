"""One identity tying an export's files together: ``model.safetensors`` (what ``cxr predict`` runs),
``model.onnx`` (what other runtimes run) and ``model.json`` (the class names the columns are read with).

At export time three SHA-256 digests are recorded in model.json under ``identity``: of the weights (every
tensor's name, type, shape and bytes), of the ONNX graph's own weights (its initializers), and of the weights'
digest together with the class list. The last, the export's identity, is also written into the ONNX metadata.
Reading an export recomputes them, so weights copied in from another export, an ONNX file of another export,
or a class list reordered consistently in model.json and the ONNX metadata are refused instead of relabelling
or replacing every prediction. Each function returns what is wrong, in words, or None.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import torch

FIELD = "identity"
METADATA_KEY = "identity"
DIGEST = re.compile(r"[0-9a-f]{64}")


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (the same for the model's state
    dict and for the tensors read back from model.safetensors)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def onnx_weights_digest(graph: Any) -> str:
    """SHA-256 over the ONNX graph's initializers (its weights, as the exporter folded them), in file order."""
    digest = hashlib.sha256()
    for initializer in graph.graph.initializer:
        digest.update(initializer.SerializeToString(deterministic=True))
    return digest.hexdigest()


def export_identity(weights_sha256: str, classes: list[str]) -> str:
    """The digest of the weights' digest and the class list, in order: change either and it changes."""
    return hashlib.sha256(json.dumps({"weights_sha256": weights_sha256, "classes": list(classes)}).encode()).hexdigest()


def recorded_identity(description: dict[str, Any]) -> str | None:
    """What is wrong with model.json's ``identity`` field (three hex digests), or None."""
    recorded = description.get(FIELD)
    keys = ("sha256", "weights_sha256", "onnx_weights_sha256")
    if not (isinstance(recorded, dict) and all(isinstance(recorded.get(k), str) and DIGEST.fullmatch(recorded[k])
                                               for k in keys)):
        return ("has no valid 'identity' (written by cxr export since issue 31 to tie model.json, model.onnx "
                "and model.safetensors together)")
    return None


def weights_mismatch(description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str | None:
    """Whether model.safetensors and the class list of model.json are the ones this export was made with."""
    recorded, found = description[FIELD], weights_digest(tensors)
    if found != recorded["weights_sha256"]:
        return ("model.safetensors holds other weights than this export was made with (their digest differs from "
                "model.json's identity): it was replaced, perhaps by another export's")
    if export_identity(found, description["classes"]) != recorded["sha256"]:
        return (f"the class list {description['classes']} is not the one this export was made with (model.json's "
                "identity covers the weights and the class order): the classes were edited")
    return None


def onnx_mismatch(description: dict[str, Any], graph: Any) -> str | None:
    """Whether model.onnx is the one this export wrote: its metadata's identity and its own weights' digest."""
    recorded = description[FIELD]
    metadata = {prop.key: prop.value for prop in graph.metadata_props}
    if metadata.get(METADATA_KEY) != recorded["sha256"]:
        return "model.onnx belongs to another export (the identity in its metadata differs from model.json's)"
    if onnx_weights_digest(graph) != recorded["onnx_weights_sha256"]:
        return "model.onnx holds other weights than this export wrote (their digest differs from model.json's)"
    return None
