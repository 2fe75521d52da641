"""Command-line interface: ``cxr list``, ``train``, ``evaluate``, ``predict``, ``export``, ``serve`` and the rest (``cxr -h``)."""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path
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


def _cache_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-cache", dest="cache", action="store_false",
                        help="decode and transform every image on every pass (no decoded-image cache)")
    parser.add_argument("--cache-dir", help="decoded-image cache folder (default: $CXR_CACHE_DIR, else ~/.cache/cxr)")


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
    train.add_argument("--limit", type=positive_int, help="at most N images per class in each split (a quick run)")
    train.add_argument("--lr", type=positive_float, help="head learning rate")
    train.add_argument("--backbone-lr", type=positive_float, help="learning rate of a trained backbone (resnet50_full)")
    train.add_argument("--warmup-epochs", type=non_negative_int, help="epochs of linear learning-rate warm-up")
    train.add_argument("--patience", type=non_negative_int, help="early-stopping patience in epochs (0: off)")
    train.add_argument("--weights", help="imagenet (default), none, or PATH to a local .pth state dict")
    train.add_argument("--seed", type=non_negative_int, default=42)
    train.add_argument("--val-source", choices=["carve", "given"], default="carve",
                       help="carve a stratified 10%% validation split out of train (default) or use Kaggle's val")
    train.add_argument("--workers", type=non_negative_int, help="DataLoader worker processes")
    train.add_argument("--resume", action="store_true", help="continue from OUT/<experiment>/checkpoints/last.pt")
    train.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms only (bit-identical reruns on one machine; slower on a GPU)")
    _cache_options(train)
    train.add_argument("--no-augment", dest="augment", action="store_const", const=False,
                       help="no training augmentation (a frozen backbone's features are then computed once)")
    train.add_argument("--feature-cache", choices=["auto", "off"], default="auto",
                       help="auto (default): train a frozen backbone's head on cached features where nothing is augmented")
    train.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False,
                       help="run every training step eagerly (default on a GPU: a fully trained network's full "
                            "batches replay CUDA graphs)")
    train.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                       help="write no TensorBoard event files (default: OUT/<experiment>/tensorboard/)")

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint on the test split")
    evaluate.add_argument("experiment", choices=sorted(EXPERIMENTS))
    evaluate.add_argument("--checkpoint", required=True)
    _common(evaluate)
    evaluate.add_argument("--tta", action="store_true",
                          help="also report test-time augmentation (centre crop, whole square, small shifts; each mirrored)")
    _cache_options(evaluate)

    predict = commands.add_parser("predict", help="classify image files or folders with a trained checkpoint")
    predict.add_argument("paths", nargs="+", metavar="PATH",
                         help="image files (JPEG, PNG, DICOM), or folders searched recursively")
    predict.add_argument("--checkpoint", required=True,
                         help="a checkpoint written by cxr train (best.pt), or a folder written by cxr export")
    predict.add_argument("--csv", help="also write the table (every class's probability) to this CSV file")
    predict.add_argument("--cam", metavar="DIR", help="write each image beside its Grad-CAM overlay into DIR")
    predict.add_argument("--device", help="cuda, mps, cpu or cuda:N (default: best available)")
    predict.add_argument("--tta", action="store_true",
                         help="average over eight views (centre crop, whole square, small shifts; each mirrored)")
    predict.add_argument("--batch-size", type=positive_int, default=16)
    predict.add_argument("--quiet", action="store_true", help="no progress bars")

    serve = commands.add_parser("serve", help="a local demo page: upload an image, see its prediction and Grad-CAM")
    serve.add_argument("--checkpoint", required=True,
                       help="a checkpoint written by cxr train (best.pt), or a folder written by cxr export")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every network)")
    serve.add_argument("--port", type=positive_int, help="port (default: 7860, or the next free one up to 7959)")
    serve.add_argument("--device", help="cuda, mps, cpu or cuda:N (default: best available)")
    export = commands.add_parser("export", help="write a checkpoint as ONNX, safetensors and model.json")
    export.add_argument("--checkpoint", required=True, help="a checkpoint written by cxr train (best.pt)")
    export.add_argument("--out", required=True, metavar="DIR", help="folder to create for the three files")
    export.add_argument("--force", action="store_true", help="replace an earlier export in DIR")

    audit = commands.add_parser("audit", help="check the dataset: counts, skipped files, sizes, duplicates, leakage")
    audit.add_argument("--data-dir", help="dataset folder (default: $CXR_DATA_DIR, else download with kagglehub)")
    audit.add_argument("--out", default="assets", help="the JSON report goes to OUT/audit.json (default: assets)")
    audit.add_argument("--quiet", action="store_true", help="no progress bar")
    audit.add_argument("--cache-dir", help="decoded-image cache the audit fills and training reuses "
                       "(default: $CXR_CACHE_DIR, else ~/.cache/cxr)")

    compare = commands.add_parser("compare", help="figure: every experiment's test metrics with 95%% intervals")
    compare.add_argument("metrics", nargs="*", metavar="METRICS_JSON", help="default: OUT/*/metrics.json")
    compare.add_argument("--out", default="assets", help="folder read by default and written to (default: assets)")

    report = commands.add_parser("report", help="write README's results table from ASSETS/*/metrics.json")
    report.add_argument("--assets", default="assets", help="folder of <experiment>/metrics.json (default: assets)")
    report.add_argument("--readme", default="README.md", help="file holding the results markers (default: README.md)")
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
    intervals = test.get("ci95", {})

    def score(key: str) -> str:
        interval = intervals.get(key)
        return f"{test[key]:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")

    print(
        f"{name}: test accuracy {score('accuracy')}, macro-F1 {score('macro_f1')}, "
        f"balanced accuracy {score('balanced_accuracy')}" + (" (95% bootstrap intervals)" if intervals else "")
        + f"; files in {out}/{name}/"
    )


def _predict(args: argparse.Namespace) -> int:
    from .predict import format_table, run_predict

    result = run_predict(args.checkpoint, args.paths, args.csv, args.cam, args.device, args.tta, args.batch_size,
                         progress=not args.quiet)
    for path, reason in result.failures:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if result.table.empty:
        print("error: none of the given files could be read as an image.", file=sys.stderr)
        return 1
    print(format_table(result.table))
    notes = [f"{len(result.table)} image(s) classified" + (f", {len(result.failures)} skipped" if result.failures else "")]
    if args.csv:
        notes.append(f"table in {args.csv}")
    if args.cam:
        notes.append(f"Grad-CAM overlays in {Path(args.cam)}/")
    print("; ".join(notes))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import ServeError, serve

    try:
        serve(args.checkpoint, args.host, args.port, args.device)
    except ServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
def _export(args: argparse.Namespace) -> int:
    from .export import FILES, export_model

    description = export_model(args.checkpoint, args.out, args.force)
    sizes = ", ".join(f"{name} ({(Path(args.out) / name).stat().st_size / 2**20:.1f} MiB)" for name in FILES.values())
    difference = description["onnx"]["max_probability_difference_to_pytorch"]
    print(f"exported {description['experiment']['name']} to {args.out}/: {sizes}; "
          f"onnxruntime matches PyTorch within {difference:.1g}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from .audit import audit_dataset, format_audit, write_audit

    report = audit_dataset(args.data_dir, progress=not args.quiet, cache_dir=args.cache_dir)
    print(format_audit(report))
    print(f"\nFull report: {write_audit(report, args.out)}")
    return 0


def _resume_command(argv: Sequence[str] | None) -> str:
    """The command line that continues an interrupted ``cxr train``: the same options plus --resume."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["cxr", *args, *([] if "--resume" in args else ["--resume"])])


def _compare(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from .compare import plot_comparison

    paths = args.metrics or sorted(Path(args.out).glob("*/metrics.json"))
    if not paths:
        print(f"error: no {args.out}/*/metrics.json found; train or evaluate an experiment first.", file=sys.stderr)
        return 1
    out_png = Path(args.out) / "comparison.png"
    plt.close(plot_comparison(paths, out_png))
    print(f"compared {len(paths)} experiment(s): {out_png}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import ReportError, write_report

    try:
        names = write_report(args.assets, args.readme)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.readme}: results of {', '.join(names)} from {args.assets}/*/metrics.json")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        _print_experiments()
        return 0
    if args.command == "report":
        return _report(args)

    import matplotlib

    matplotlib.use("Agg")
    import torch

    from . import distributed
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .engine import TrainingError, TrainingInterrupted
    from .export import ExportError
    from .models import WeightsError
    from .workflow import evaluate_checkpoint, train_experiment

    # Under torchrun every process runs this: warnings and results are shown once, by rank 0.
    warnings.simplefilter("always" if distributed.is_main() else "ignore", UserWarning)
    try:
        if args.command == "train":
            metrics = train_experiment(
                args.experiment, data_dir=args.data_dir, out=args.out, device=args.device, seed=args.seed,
                val_source=args.val_source, workers=args.workers, resume=args.resume, progress=not args.quiet,
                epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size, lr=args.lr,
                backbone_lr=args.backbone_lr, warmup_epochs=args.warmup_epochs,
                patience=args.patience, weights=args.weights, deterministic=args.deterministic,
                cache=args.cache, cache_dir=args.cache_dir, augment=args.augment,
                feature_cache=args.feature_cache == "auto",
                compile=args.compile, tensorboard=args.tensorboard, cuda_graphs=args.cuda_graphs, limit=args.limit,
            )
        elif args.command == "predict":
            return _predict(args)
        elif args.command == "serve":
            return _serve(args)
        elif args.command == "compare":
            return _compare(args)
        elif args.command == "audit":
            return _audit(args)
        elif args.command == "export":
            return _export(args)
        else:
            metrics = evaluate_checkpoint(args.checkpoint, args.experiment, data_dir=args.data_dir, out=args.out,
                                          device=args.device, progress=not args.quiet, tta=args.tta,
                                          cache=args.cache, cache_dir=args.cache_dir)
        distributed.barrier()  # the other ranks wait until rank 0 has written every file
    except TrainingInterrupted as error:
        command = _resume_command(argv)
        if distributed.launched_by_torchrun():
            command = f"torchrun [the same torchrun options] -m {command}"
        resume = f"\nResume with: {command}" if error.saved_epochs else ""
        print(f"\n{error}{resume}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:
        print("error: the GPU ran out of memory; try a smaller --batch-size (or --image-size).", file=sys.stderr)
        return 1
    except (DatasetError, WeightsError, CheckpointError, TrainingError, ExportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()
    if distributed.is_main():
        _print_metrics(metrics, args.out, args.experiment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
