"""Refusing bad input before the work starts: the checks of the CLI's arguments (the exception and the path
checks they raise with live in :mod:`cxr.common.inputs`).
The argument checks need neither torch nor the data's pixels and run before the heavy imports, so a wrong
path or value is reported in well under a second instead of after torch has loaded (about 10 s on 2 CPU
cores) or after the audit has read every image."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from cxr.models.backbones import get_backbone
from cxr.config import EXPERIMENTS
from cxr.common.inputs import LARGEST_IMAGE, SMALLEST_IMAGE, InputError, not_an_input, require
from cxr.data.layout import DatasetError, locate_dataset

DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")


def check_device(device: str | None) -> None:
    if device is not None and not DEVICE.fullmatch(device):
        raise InputError(f"--device {device!r} is not a device; use cuda, cuda:N, mps or cpu.")


def check_image_size(size: int, arch: str) -> None:
    """The sizes a backbone can take: within [32, 1024] pixels, and a whole number of ViT patches."""
    require(SMALLEST_IMAGE <= size <= LARGEST_IMAGE,
            f"--image-size {size} is outside {SMALLEST_IMAGE}-{LARGEST_IMAGE} px: below {SMALLEST_IMAGE} a {arch} "
            f"sees a single feature pixel and learns nothing, above {LARGEST_IMAGE} the decoded images do not fit "
            "in memory.")
    patch = get_backbone(arch).patch
    require(not patch or size % patch == 0,
            f"--image-size {size} does not suit {arch}: it cuts the image into {patch} px patches, so the size "
            f"must be a multiple of {patch} (e.g. {max(2, round(size / (patch or 1))) * (patch or 1)}).")


WEIGHTS_ENV = "CXR_WEIGHTS"


def weights_setting(given: str | None) -> str | None:
    """The weights a run starts from: ``--weights`` when given, else ``$CXR_WEIGHTS``, else None (the
    experiment's own, ``imagenet``). ``imagenet`` and ``none`` are accepted in any case."""
    chosen = given if given is not None else os.environ.get(WEIGHTS_ENV, "").strip() or None
    return chosen.lower() if chosen and chosen.lower() in ("imagenet", "none") else chosen


def check_weights_file(given: str | None) -> None:
    """A local weights file named by ``--weights`` or ``$CXR_WEIGHTS`` exists (whether it fits the
    architecture is checked once torch is loaded, still before anything is written)."""
    chosen = weights_setting(given)
    if chosen is None or chosen in ("imagenet", "none"):
        return
    flag = "--weights" if given is not None else WEIGHTS_ENV
    path = Path(chosen).expanduser()
    require(not path.is_dir(), f"{flag} {chosen!r} is a folder; give imagenet, none or a .pt/.pth state dict file.")
    require(path.is_file(), f"{flag} {chosen!r} is neither imagenet, none nor an existing file; give a .pt/.pth "
                            "state dict (docs/mobilenet-cpu.md says how to get MobileNetV2's ImageNet weights).")


def check_output_folder(out: str | os.PathLike, flag: str = "--out") -> None:
    """``out`` is (or can become) a folder this process may write into."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {str(path)!r} is a file, not a folder; give a folder.")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{flag} {str(path)!r} cannot be written ({str(existing)!r} is a file).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {str(path)!r} cannot be written ({str(existing)!r} is not writable).")


def check_output_file(path: str | os.PathLike | None, flag: str) -> None:
    if path is not None and Path(path).is_dir():
        raise InputError(f"{flag} {str(path)!r} is a folder, not a file name.")
    if path is not None:
        check_output_folder(Path(path).expanduser().absolute().parent, flag)


def check_checkpoint(path: str | os.PathLike, export_folder_allowed: bool) -> None:
    """A checkpoint file (or, where allowed, a folder written by ``cxr export``) that exists."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"--checkpoint {str(path)!r} does not exist; train one first (`cxr train EXPERIMENT` "
                             "writes OUT/EXPERIMENT/checkpoints/best.pt).")
    if path.is_dir() and not export_folder_allowed:
        raise InputError(f"--checkpoint {str(path)!r} is a folder (an export?); this command needs the "
                             "checkpoint file written by cxr train (OUT/EXPERIMENT/checkpoints/best.pt).")
    if path.is_file() and not os.access(path, os.R_OK):
        raise InputError(f"--checkpoint {str(path)!r} cannot be read (permissions).")


def check_data_dir(data_dir: str | None) -> None:
    """A given (or ``$CXR_DATA_DIR``) dataset folder exists and holds train/ and test/; without either the
    dataset is downloaded later."""
    if data_dir or os.environ.get("CXR_DATA_DIR"):
        try:
            locate_dataset(data_dir)
        except DatasetError as error:
            raise InputError(str(error)) from None


def check_arguments(args: argparse.Namespace) -> None:
    """Everything about ``args`` that can be known before torch is imported."""
    check_device(getattr(args, "device", None))
    command = args.command
    if command == "train":
        arch = EXPERIMENTS[args.experiment].arch
        check_image_size(args.image_size or EXPERIMENTS[args.experiment].image_size, arch)
        check_weights_file(args.weights)
        from cxr.data.added_folders import AddedFolders, check_added  # it imports this module

        check_added(AddedFolders.from_args(args), args.external, args.seed)
    if command in ("train", "evaluate", "audit", "compare"):
        check_output_folder(args.out)
    if command in ("train", "evaluate", "audit"):
        check_data_dir(args.data_dir)
    if command in ("evaluate", "export", "predict", "serve"):
        check_checkpoint(args.checkpoint, export_folder_allowed=command in ("predict", "serve"))
    if command == "predict":
        check_output_file(args.csv, "--csv")
        if args.csv is not None:
            not_an_input(args.csv, args.paths, "--csv")
        if args.cam is not None:
            check_output_folder(args.cam, "--cam")
