"""Checkpoints as plain dicts: written atomically, read with ``weights_only=True``, checked before use."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "cxr-checkpoint/1"
REQUIRED_KEYS = ("format", "model", "experiment", "classes", "epoch")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, unsafe or belongs to something else."""


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """Write ``state`` to a temporary file beside ``path``, then rename it over ``path``: a crash or a
    full disk never leaves a half-written checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"format": FORMAT, **state}, temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        raise CheckpointError(
            f"Could not write checkpoint {str(path)!r} ({error}); is the disk full? The previous checkpoint "
            "there, if any, is unchanged."
        ) from None
    finally:  # also on Ctrl-C or a pickling error mid-write; after the rename there is nothing left to remove
        temporary.unlink(missing_ok=True)
    return path


def load_checkpoint(
    path: str | os.PathLike, experiment: str | None = None, arch: str | None = None, classes=None
) -> dict[str, Any]:
    """Load a checkpoint without executing code (``weights_only=True``) and refuse one that belongs
    to another experiment, architecture or class list."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "no data"
        first_line = f"{type(error).__name__}: {detail}"
        raise CheckpointError(
            f"{str(path)!r} is not a cxr checkpoint, or holds objects other than tensors and plain data "
            f"and was refused without running them ({first_line})."
        ) from None
    if (not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in REQUIRED_KEYS)
            or not isinstance(state["experiment"], dict)):
        raise CheckpointError(f"{str(path)!r} is not a cxr checkpoint (format {FORMAT!r} expected).")
    found = state["experiment"]
    if experiment is not None and found.get("name") != experiment:
        raise CheckpointError(
            f"{str(path)!r} belongs to experiment {found.get('name')!r}, not {experiment!r}."
        )
    if arch is not None and found.get("arch") != arch:
        raise CheckpointError(f"{str(path)!r} holds a {found.get('arch')!r} model, not {arch!r}.")
    if classes is not None and list(state["classes"]) != list(classes):
        raise CheckpointError(
            f"{str(path)!r} was trained on classes {list(state['classes'])}, not {list(classes)}."
        )
    return state
