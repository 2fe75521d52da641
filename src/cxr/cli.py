"""Command-line interface: ``cxr list``, ``cxr train``, ``cxr evaluate``."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from .config import EXPERIMENTS


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="dataset folder (default: $CXR_DATA_DIR, else download with kagglehub)")
    parser.add_argument("--device", help="cuda, mps, cpu or cuda:N (default: best available)")
    parser.add_argument("--out", default="assets", help="output folder; files go to OUT/<experiment>/ (default: assets)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description="Chest X-ray classification experiments.")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("list", help="print the experiments and their configuration")

    train = commands.add_parser("train", help="train an experiment and evaluate it on the test split")
    train.add_argument("experiment", choices=sorted(EXPERIMENTS))
    _common(train)
    train.add_argument("--epochs", type=positive_int)
    train.add_argument("--batch-size", type=positive_int)
    train.add_argument("--image-size", type=positive_int)
    train.add_argument("--lr", type=positive_float, help="head learning rate")
    train.add_argument("--patience", type=non_negative_int, help="early-stopping patience in epochs (0: off)")
    train.add_argument("--weights", help="imagenet (default), none, or PATH to a local .pth state dict")
    train.add_argument("--seed", type=non_negative_int, default=42)
    train.add_argument("--val-source", choices=["carve", "given"], default="carve",
                       help="carve a stratified 10%% validation split out of train (default) or use Kaggle's val")
    train.add_argument("--workers", type=non_negative_int, help="DataLoader worker processes")
    train.add_argument("--resume", action="store_true", help="continue from OUT/<experiment>/checkpoints/last.pt")

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint on the test split")
    evaluate.add_argument("experiment", choices=sorted(EXPERIMENTS))
    evaluate.add_argument("--checkpoint", required=True)
    _common(evaluate)
    return parser


def _print_experiments() -> None:
    for experiment in EXPERIMENTS.values():
        print(f"{experiment.name}: {experiment.summary}")
        for key, value in experiment.to_dict().items():
            if key not in ("name", "summary"):
                print(f"    {key:<16} {value}")
        print()


def _print_metrics(metrics: dict, out: str, name: str) -> None:
    test = metrics.get("test", metrics)
    print(
        f"{name}: test accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}, "
        f"balanced accuracy {test['balanced_accuracy']:.3f}; files in {out}/{name}/"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        _print_experiments()
        return 0

    import matplotlib

    matplotlib.use("Agg")
    import torch

    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .engine import TrainingError, TrainingInterrupted
    from .models import WeightsError
    from .workflow import evaluate_checkpoint, train_experiment

    warnings.simplefilter("always", UserWarning)
    try:
        if args.command == "train":
            metrics = train_experiment(
                args.experiment, data_dir=args.data_dir, out=args.out, device=args.device, seed=args.seed,
                val_source=args.val_source, workers=args.workers, resume=args.resume, progress=not args.quiet,
                epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size, lr=args.lr,
                patience=args.patience, weights=args.weights,
            )
        else:
            metrics = evaluate_checkpoint(args.checkpoint, args.experiment, data_dir=args.data_dir, out=args.out,
                                          device=args.device, progress=not args.quiet)
    except TrainingInterrupted as error:
        print(f"\n{error}", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:
        print("error: the GPU ran out of memory; try a smaller --batch-size (or --image-size).", file=sys.stderr)
        return 1
    except (DatasetError, WeightsError, CheckpointError, TrainingError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    _print_metrics(metrics, args.out, args.experiment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
