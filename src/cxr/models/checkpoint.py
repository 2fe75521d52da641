"""Checkpoints as plain dicts: written atomically, read with ``weights_only=True``, checked before use."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from cxr.common.inputs import LARGEST_IMAGE, SMALLEST_IMAGE
from cxr.common.runlock import pid_running
from cxr.common.torchfile import archive_problem, load_problem

FORMAT = "cxr-checkpoint/1"
REQUIRED_KEYS = ("format", "model", "experiment", "classes", "epoch")
# How every torch.save file starts: a zip archive (b"PK"), or the pickle protocol opcode of the legacy format.
TORCH_MAGIC = (b"PK", b"\x80\x02")


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


def link_checkpoint(source: Path, path: Path) -> Path:
    """Give the finished checkpoint ``source`` the second name ``path`` without serialising it again: a hard
    link made beside ``path`` and renamed over it (atomic, as in :func:`save_checkpoint`), or a copy where the
    filesystem has no hard links. Checkpoints are only ever replaced, never changed in place, so the two
    names never see each other's later writes."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.unlink(missing_ok=True)
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise CheckpointError(
            f"Could not write checkpoint {str(path)!r} ({error}); is the disk full? The previous checkpoint "
            "there, if any, is unchanged."
        ) from None
    finally:
        temporary.unlink(missing_ok=True)
    return path


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files (``.<name>.<pid>.tmp``, each as large as a checkpoint) that runs killed
    mid-write (``kill -9``, a power cut) left in ``folder``; files of live processes are kept."""
    removed = []
    for temporary in Path(folder).glob(".*.*.tmp"):
        pid = temporary.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_running(int(pid)):
            temporary.unlink(missing_ok=True)
            removed.append(temporary)
    return removed


def host_copy(state: Any) -> Any:
    """A copy of ``state`` (nested dicts, lists and tuples of tensors and plain values) whose tensors live in
    host memory and share nothing with the originals: training may go on changing those at once. From a
    GPU the tensors are copied into pinned memory without waiting per tensor, then synchronised once."""
    pending_cuda = False

    def copy(value: Any) -> Any:
        nonlocal pending_cuda
        if isinstance(value, torch.Tensor):
            if value.device.type == "cuda":
                pending_cuda = True
                host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                return host.copy_(value.detach(), non_blocking=True)
            return value.detach().clone()
        if isinstance(value, dict):
            return {key: copy(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(item) for item in value)
        return value

    copied = copy(state)
    if pending_cuda:
        torch.cuda.synchronize()
    return copied


class CheckpointWriter:
    """Writes checkpoints in a background thread, off the training loop's critical path.

    :meth:`save` takes a host copy of the state (:func:`host_copy`, milliseconds) and returns; the thread
    then writes the first file with :func:`save_checkpoint` (temporary file, then rename), so a kill or a crash
    mid-write leaves the previous checkpoint in place, and gives the others the same content as hard links
    (:func:`link_checkpoint`): ``best.pt`` and ``last.pt`` of a best epoch are serialised once. At most one
    write is in flight: :meth:`save` and :meth:`wait` first wait for the previous one and re-raise its error,
    so a failure is never lost."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any], *paths: Path, then: Callable[[], None] | None = None) -> dict[str, Any]:
        """Start writing ``state`` to ``paths``, then call ``then`` (in the thread, only once every file is
        in place: history.csv is written after the checkpoint, so it never lists an epoch the checkpoint
        lacks); returns the host copy being written (the caller must not change it)."""
        self.wait()
        snapshot = host_copy(state)

        def write() -> None:
            try:
                save_checkpoint(snapshot, paths[0])
                for path in paths[1:]:
                    link_checkpoint(paths[0], path)
                if then is not None:
                    then()
            except BaseException as error:  # handed to the training thread by wait()
                self._error = error

        self._thread = threading.Thread(target=write, name="checkpoint-writer", daemon=False)
        self._thread.start()
        return snapshot

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def non_finite_tensor(tensors: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity, or None."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_weights(state: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint without weights, or with NaN or infinite weights: it would predict NaN for
    every image (argmax 0, the first class) and evaluate to a plausible-looking accuracy."""
    model = state["model"]
    if not isinstance(model, dict) or not model or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(f"{str(path)!r} holds no model weights (its 'model' entry is empty or not a state dict).")
    bad = non_finite_tensor(model)
    if bad is not None:
        raise CheckpointError(f"{str(path)!r} holds non-finite weights (NaN or infinity in {bad!r}); "
                              "it cannot predict anything. Use an earlier checkpoint.")


def check_preprocessing(state: dict[str, Any], path: Path) -> None:
    """Refuse image sizes no model of ours is trained at, before anything is allocated for them: an edited
    ``image_size`` of 100000 asked for a 120 GB probe image, 4096 took 80 s and 4.8 GB to load."""
    prep = state.get("preprocessing") if isinstance(state.get("preprocessing"), dict) else {}
    sizes = {"experiment.image_size": state["experiment"].get("image_size", SMALLEST_IMAGE),
             "preprocessing.image_size": prep.get("image_size", SMALLEST_IMAGE)}
    for field, value in sizes.items():
        if not (isinstance(value, int) and SMALLEST_IMAGE <= value <= LARGEST_IMAGE):
            raise CheckpointError(f"{str(path)!r} has {field} {value!r}, outside {SMALLEST_IMAGE}-{LARGEST_IMAGE} px; "
                                  "no cxr model is trained at that size (an edited or damaged checkpoint).")
    resize = prep.get("resize")
    if resize is not None and not (isinstance(resize, int) and prep.get("image_size", 0) <= resize <= 2 * LARGEST_IMAGE):
        raise CheckpointError(f"{str(path)!r} has preprocessing.resize {resize!r}: it must be a whole number of pixels "
                              f"from the image size to {2 * LARGEST_IMAGE} (an edited or damaged checkpoint).")


def load_checkpoint(
    path: str | os.PathLike, experiment: str | None = None, arch: str | None = None, classes=None
) -> dict[str, Any]:
    """Load a checkpoint without executing code (``weights_only=True``) and refuse one that belongs
    to another experiment, architecture or class list."""
    path = Path(path)
    if path.is_dir():
        export = " made by cxr export (cxr predict and cxr serve read it)" if (path / "model.json").is_file() else ""
        raise CheckpointError(f"{str(path)!r} is a folder{export}, not a checkpoint file; give the .pt file "
                              "written by cxr train (OUT/<experiment>/checkpoints/best.pt).")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist.")
    with open(path, "rb") as handle:
        magic = handle.read(2)
    if magic and magic not in TORCH_MAGIC:  # random bytes: torch would blame its weights_only default
        raise CheckpointError(f"{str(path)!r} is not a cxr checkpoint (not a file written by torch.save).")
    problem = archive_problem(path) if magic else None
    if problem is not None:
        raise CheckpointError(f"{str(path)!r} {problem}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if magic and load_problem(error).startswith("is truncated"):
            raise CheckpointError(f"{str(path)!r} {load_problem(error)}.") from None
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "no data"
        first_line = f"{type(error).__name__}: {detail}"
        raise CheckpointError(
            f"{str(path)!r} is not a cxr checkpoint, or holds objects other than tensors and plain data "
            f"and was refused without running them ({first_line})."
        ) from None
    if (not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in REQUIRED_KEYS)
            or not isinstance(state["experiment"], dict)):
        raise CheckpointError(f"{str(path)!r} is not a cxr checkpoint (format {FORMAT!r} expected).")
    check_weights(state, path)
    check_preprocessing(state, path)
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
