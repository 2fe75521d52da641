"""Classify single images (JPEG, PNG, DICOM) with a trained checkpoint, optionally with a Grad-CAM overlay.

The checkpoint brings its class names and preprocessing (resize, crop, normalisation), and every file is
decoded by the same function as the training and test images (:func:`cxr.imageio.decode_image`) and
cropped by the same tensor transform, so an image gets the probabilities ``cxr evaluate`` gives it.
A file that cannot be read is reported and skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from .progress import tqdm

from . import uncertainty
from .data import IMAGE_EXTENSIONS, check_image
from .export import load_for_inference
from .preflight import writable_file, writable_folder
from .imageio import ImageReadError, decode_image
from .runtime import Runtime


@dataclass
class Predictions:
    """One row per classified image (file, predicted class, its probability, every class's
    probability), the inputs that could not be used with the reason, and the Grad-CAM files written."""

    table: pd.DataFrame
    failures: list[tuple[Path, str]] = field(default_factory=list)
    cam_files: list[Path] = field(default_factory=list)


def collect_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders (searched recursively for .jpg/.jpeg/.png/.dcm/.dicom) into image paths; a missing
    path or an empty folder is reported instead. A file named explicitly is tried whatever its suffix."""
    found: list[Path] = []
    failures: list[tuple[Path, str]] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            images = sorted(p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                            and not p.name.startswith("."))
            found.extend(images)
            if not images:
                failures.append((entry, "folder holds no .jpg, .jpeg, .png or .dcm file"))
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


def _cam_name(path: Path, taken: set[str]) -> str:
    """``<stem>_cam.png``, made unique when two inputs share a stem."""
    name, counter = f"{path.stem}_cam.png", 2
    while name in taken:
        name, counter = f"{path.stem}_{counter}_cam.png", counter + 1
    taken.add(name)
    return name


def predict_images(
    model: torch.nn.Module, classes: Sequence[str], preprocessing: dict[str, Any], paths: Sequence[Path],
    runtime: Runtime, batch_size: int = 16, tta: bool = False, cam_dir: Path | None = None,
) -> Predictions:
    """Class probabilities for every readable image of ``paths``; with ``tta``, averaged over the views of
    ``uncertainty.TTAViews``; with ``cam_dir``, one image + Grad-CAM PNG per image."""
    if cam_dir is not None:
        from . import cam  # imported only when asked for: it needs the grad-cam package
    runtime.prepare_model(model).eval()
    side, transform = uncertainty.square_side(preprocessing), uncertainty.eval_transform(preprocessing)
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
        predicted = probabilities.argmax(1)
        for (path, _), p, k in zip(loaded, probabilities, predicted):
            rows.append({"file": str(path), "prediction": classes[k], "probability": float(p[k]),
                         **{name: float(value) for name, value in zip(classes, p)}})
        if cam_dir is not None:
            heat_maps = cam.grad_cam(model, inputs, predicted)
            for row, image, heat_map in zip(rows[-len(loaded):], inputs, heat_maps):
                display, caption = cam.as_display(image, preprocessing), f"{row['prediction']} {row['probability']:.2f}"
                written = cam.save_overlay(display, heat_map, Path(cam_dir) / _cam_name(Path(row["file"]), taken), caption)
                row["cam"] = str(written)
                cam_files.append(written)
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
    model, classes, prep = load_for_inference(checkpoint)
    paths, failures = collect_images(inputs)
    result = predict_images(model, classes, prep, paths, runtime, batch_size, tta,
                            Path(cam_dir) if cam_dir else None)
    result.failures[:0] = failures
    if csv_path is not None:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        result.table.to_csv(csv_path, index=False, float_format="%.6f")
    return result


def format_table(table: pd.DataFrame) -> str:
    """The predictions as an aligned text table, probabilities to three decimals."""
    if table.empty:
        return "(no image classified)"
    return table.to_string(index=False, float_format=lambda v: f"{v:.3f}")

