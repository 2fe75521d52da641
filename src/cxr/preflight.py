"""Checks of a command's arguments that need neither torch nor the data's pixels, run before the heavy
imports, so a wrong path or value is reported in well under a second instead of after torch has loaded
(about 10 s on 2 CPU cores) or after the audit has read every image."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from .config import EXPERIMENTS
from .layout import DatasetError, locate_dataset

DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")
SMALLEST_IMAGE = 32  # a ResNet's stride: below it the last stage sees less than one pixel
LARGEST_IMAGE = 1024  # the decoded-image cache holds squares of 8/7 of this side: 1.3 MB per image
PATCH = {"vit_b_16": 16}


class PreflightError(ValueError):
    """An argument that cannot work; the message names it and says what would."""


def check_device(device: str | None) -> None:
    if device is not None and not DEVICE.fullmatch(device):
        raise PreflightError(f"--device {device!r} is not a device; use cuda, cuda:N, mps or cpu.")


def check_image_size(size: int, arch: str) -> None:
    """The sizes a backbone can take: within [32, 1024] pixels, and a whole number of ViT patches."""
    if not SMALLEST_IMAGE <= size <= LARGEST_IMAGE:
        raise PreflightError(f"--image-size {size} is outside {SMALLEST_IMAGE}-{LARGEST_IMAGE} pixels; "
                             "smaller images leave a backbone next to nothing to see, larger ones do not fit the image cache.")
    patch = PATCH.get(arch)
    if patch and size % patch:
        raise PreflightError(f"--image-size {size} is not a multiple of {arch}'s {patch}-pixel patches; "
                             f"try {max(patch, size // patch * patch)}.")


def check_output_folder(out: str | os.PathLike, flag: str = "--out") -> None:
    """``out`` is (or can become) a folder this process may write into."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise PreflightError(f"{flag} {str(path)!r} is a file; give a folder.")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise PreflightError(f"{flag} {str(path)!r} cannot be written ({str(existing)!r} is a file).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(f"{flag} {str(path)!r} cannot be written ({str(existing)!r} is not writable).")


def check_output_file(path: str | os.PathLike | None, flag: str) -> None:
    if path is not None and Path(path).is_dir():
        raise PreflightError(f"{flag} {str(path)!r} is a folder; give a file name.")
    if path is not None:
        check_output_folder(Path(path).expanduser().absolute().parent, flag)


def check_checkpoint(path: str | os.PathLike, export_folder_allowed: bool) -> None:
    """A checkpoint file (or, where allowed, a folder written by ``cxr export``) that exists."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PreflightError(f"--checkpoint {str(path)!r} does not exist; train one first (`cxr train EXPERIMENT` "
                             "writes OUT/EXPERIMENT/checkpoints/best.pt).")
    if path.is_dir() and not export_folder_allowed:
        raise PreflightError(f"--checkpoint {str(path)!r} is a folder (an export?); this command needs the "
                             "checkpoint file written by cxr train (OUT/EXPERIMENT/checkpoints/best.pt).")
    if path.is_file() and not os.access(path, os.R_OK):
        raise PreflightError(f"--checkpoint {str(path)!r} cannot be read (permissions).")


def check_data_dir(data_dir: str | None) -> None:
    """A given (or ``$CXR_DATA_DIR``) dataset folder exists and holds train/ and test/; without either the
    dataset is downloaded later."""
    if data_dir or os.environ.get("CXR_DATA_DIR"):
        try:
            locate_dataset(data_dir)
        except DatasetError as error:
            raise PreflightError(str(error)) from None


def check_arguments(args: argparse.Namespace) -> None:
    """Everything about ``args`` that can be known before torch is imported."""
    check_device(getattr(args, "device", None))
    command = args.command
    if command == "train":
        arch = EXPERIMENTS[args.experiment].arch
        check_image_size(args.image_size or EXPERIMENTS[args.experiment].image_size, arch)
    if command in ("train", "evaluate", "audit", "compare"):
        check_output_folder(args.out)
    if command in ("train", "evaluate", "audit"):
        check_data_dir(args.data_dir)
    if command in ("evaluate", "export", "predict", "serve"):
        check_checkpoint(args.checkpoint, export_folder_allowed=command in ("predict", "serve"))
    if command == "predict":
        check_output_file(args.csv, "--csv")
        if args.cam is not None:
            check_output_folder(args.cam, "--cam")
