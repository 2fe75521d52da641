"""Classify single images (JPEG, PNG, DICOM) with a trained checkpoint, optionally with a Grad-CAM overlay.

The checkpoint brings its class names and preprocessing (resize, crop, normalisation), and every file is
decoded by the same function as the training and test images (:func:`cxr.data.imageio.decode_image`) and
cropped by the same tensor transform, so an image gets the probabilities ``cxr evaluate`` gives it.
A file that cannot be read is reported and skipped.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from cxr.common.progress import tqdm

from cxr.evaluate import uncertainty
from cxr.data.dataset import IMAGE_EXTENSIONS, check_image
from cxr.inference.export import load_for_inference
from cxr.inference.trained_model import check_finite_rows
from cxr.common.inputs import not_an_input, writable_file, writable_folder
from cxr.data.preprocessing import Preprocessing
from cxr.data.imageio import ImageReadError, decode_image
from cxr.common.runtime import Runtime


@dataclass
class Predictions:
    """One row per classified image (file, predicted class, its probability, every class's
    probability), the inputs that could not be used with the reason, and the Grad-CAM files written."""

    table: pd.DataFrame
    failures: list[tuple[Path, str]] = field(default_factory=list)
    cam_files: list[Path] = field(default_factory=list)


# Every Grad-CAM overlay ``cxr predict --cam`` writes carries this PNG text chunk: a later run over the same
# folder skips it (an overlay is not a patient's radiograph) and never takes a file without it for its own.
OVERLAY_KEY = "cxr-overlay"
OVERLAY_TEXT = {OVERLAY_KEY: "Grad-CAM overlay written by cxr predict --cam; not a radiograph"}
NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


def is_overlay(path: Path) -> bool:
    """Whether ``path`` is a PNG written by ``cxr predict --cam`` (read from its header, not its pixels)."""
    if path.suffix.lower() != ".png":
        return False
    try:
        with Image.open(path) as image:
            return OVERLAY_KEY in image.info
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def collect_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders (searched recursively for .jpg/.jpeg/.png/.dcm/.dicom) into image paths; a missing
    path or an empty folder is reported instead. A file named explicitly is tried whatever its suffix. Overlays
    an earlier ``--cam`` wrote (:func:`is_overlay`) are left out, with one note per folder."""
    found: list[Path] = []
    failures: list[tuple[Path, str]] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            candidates = sorted(p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                                and not p.name.startswith("."))
            images = [p for p in candidates if not is_overlay(p)]
            found.extend(images)
            if len(images) < len(candidates):
                failures.append((entry, f"{len(candidates) - len(images)} Grad-CAM overlay(s) written by cxr predict "
                                        "--cam left out (not radiographs)"))
            if not candidates:
                failures.append((entry, "folder holds no .jpg, .jpeg, .png or .dcm file"))
        elif entry.is_file() and is_overlay(entry):
            failures.append((entry, "a Grad-CAM overlay written by cxr predict --cam, not a radiograph"))
        elif entry.is_file():
            found.append(entry)
        else:
            failures.append((entry, "no such file or folder"))
    return found, failures


def read_image(path: Path, side: int) -> tuple[np.ndarray | None, str | None]:
    """The decoded ``side`` square, or None and why it cannot be used (empty, not an image, truncated,
    corrupt, a DICOM file without a decoder for its pixel data)."""
    reason = check_image(path)
    if reason is not None:
        return None, reason
    try:
        return decode_image(path, side), None
    except ImageReadError as error:
        return None, str(error)
    except UnidentifiedImageError:
        return None, "not an image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return None, f"unreadable ({error})"


def _short_stem(stem: str, suffix_bytes: int) -> str:
    """``stem`` cut so that it and a suffix of ``suffix_bytes`` fit one file name, with a hash of the whole
    stem, so that two long names sharing their beginning still get different overlays."""
    encoded = stem.encode("utf-8", "surrogateescape")
    if len(encoded) + suffix_bytes <= NAME_MAX:
        return stem
    kept = encoded[:NAME_MAX - suffix_bytes - 13].decode("utf-8", "ignore")
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    return f"{kept}~{digest}"


def _cam_path(path: Path, cam_dir: Path, taken: set[str], inputs: set[Path]) -> Path:
    """``<stem>_cam.png`` in ``cam_dir``, made unique when two inputs share a stem, shortened (with a hash)
    when too long for a file name, and never an input or a file an earlier ``--cam`` did not write."""
    stem, counter = _short_stem(path.stem, len("_999_cam.png")), 2
    name = f"{stem}_cam.png"
    while (name in taken or (cam_dir / name).resolve() in inputs
           or ((cam_dir / name).exists() and not is_overlay(cam_dir / name))):
        name, counter = f"{stem}_{counter}_cam.png", counter + 1
    taken.add(name)
    return cam_dir / name


def _write_overlays(model: torch.nn.Module, inputs: torch.Tensor, predicted: np.ndarray, rows: list[dict[str, Any]],
                    preprocessing: dict[str, Any], cam_dir: Path, taken: set[str], sources: set[Path],
                    ) -> tuple[list[Path], list[tuple[Path, str]]]:
    """One image + Grad-CAM PNG per row; an overlay that cannot be written costs its own file, not the run."""
    from cxr.evaluate import cam  # imported only when asked for: it needs the grad-cam package

    written, failures = [], []
    for row, image, heat_map in zip(rows, inputs, cam.grad_cam(model, inputs, predicted)):
        display, caption = cam.as_display(image, preprocessing), f"{row['prediction']} {row['probability']:.2f}"
        target = _cam_path(Path(row["file"]), cam_dir, taken, sources)
        try:
            written.append(cam.save_overlay(display, heat_map, target, caption, OVERLAY_TEXT))
            row["cam"] = str(written[-1])
        except OSError as error:
            target.unlink(missing_ok=True)
            row["cam"] = ""
            failures.append((Path(row["file"]), f"classified, but its Grad-CAM overlay {target.name!r} could not be "
                                                f"written ({error.strerror or error})"))
    return written, failures


def predict_images(
    model: torch.nn.Module, classes: Sequence[str], preprocessing: dict[str, Any], paths: Sequence[Path],
    runtime: Runtime, batch_size: int = 16, tta: bool = False, cam_dir: Path | None = None,
) -> Predictions:
    """Class probabilities for every readable image of ``paths``; with ``tta``, averaged over the views of
    ``uncertainty.TTAViews``; with ``cam_dir``, one image + Grad-CAM PNG per image."""
    sources = {Path(path).resolve() for path in paths}
    runtime.prepare_model(model).eval()
    recipe = Preprocessing.from_dict(preprocessing)
    side, transform = recipe.square_side, recipe.transform()
    views_transform = uncertainty.TTAViews.from_preprocessing(preprocessing) if tta else None
    rows, failures, cam_files, taken = [], [], [], set()
    batches = [list(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]
    for batch_paths in tqdm(batches, desc="predict", leave=False, disable=not runtime.progress):
        loaded = []
        for path in batch_paths:
            square, reason = read_image(path, side)
            if square is None:
                failures.append((path, reason))
            else:
                loaded.append((path, square))
        if not loaded:
            continue
        squares = torch.from_numpy(np.stack([square for _, square in loaded]))[:, None].to(runtime.device)
        inputs = transform(squares)
        with torch.inference_mode():
            if views_transform is not None:
                probabilities = uncertainty.average_view_probabilities(model, views_transform(squares), runtime)
            else:
                with runtime.autocast():
                    probabilities = model(runtime.to_device(inputs)).float().softmax(1)
        probabilities = probabilities.cpu().numpy()
        check_finite_rows(probabilities, [path for path, _ in loaded])
        predicted = probabilities.argmax(1)
        for (path, _), p, k in zip(loaded, probabilities, predicted):
            rows.append({"file": str(path), "prediction": classes[k], "probability": float(p[k]),
                         **{name: float(value) for name, value in zip(classes, p)}})
        if cam_dir is not None:
            written, unwritten = _write_overlays(model, inputs, predicted, rows[-len(loaded):], preprocessing,
                                                 Path(cam_dir), taken, sources)
            cam_files.extend(written)
            failures.extend(unwritten)
    columns = ["file", "prediction", "probability", *classes, *(["cam"] if cam_dir is not None else [])]
    return Predictions(pd.DataFrame(rows, columns=columns), failures, cam_files)


def run_predict(
    checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], csv_path: str | os.PathLike | None = None,
    cam_dir: str | os.PathLike | None = None, device: str | None = None, tta: bool = False, batch_size: int = 16,
    progress: bool = True,
) -> Predictions:
    """Load ``checkpoint`` (or a folder written by ``cxr export``), classify every image found in ``inputs``
    and write the CSV when asked."""
    runtime = Runtime.create(device, progress=progress)  # a bad --device, --cam or --csv is refused first
    if cam_dir is not None:
        writable_folder(cam_dir, "--cam")
    if csv_path is not None:
        writable_file(csv_path, "--csv")
    paths, failures = collect_images(inputs)
    if csv_path is not None:
        not_an_input(csv_path, paths, "--csv")
    model, classes, prep = load_for_inference(checkpoint)
    result = predict_images(model, classes, prep, paths, runtime, batch_size, tta,
                            Path(cam_dir) if cam_dir else None)
    result.failures[:0] = failures
    if csv_path is not None:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        result.table.to_csv(csv_path, index=False, float_format="%.6f", errors="surrogateescape")  # names as on disk
    return result


def format_table(table: pd.DataFrame) -> str:
    """The predictions as an aligned text table, probabilities to three decimals."""
    if table.empty:
        return "(no image classified)"
    return table.to_string(index=False, float_format=lambda v: f"{v:.3f}")

