"""Command-line interface: ``cxr list``, ``train``, ``evaluate``, ``predict``, ``export``, ``serve`` and the rest (``cxr -h``)."""

from __future__ import annotations

import argparse
import io
import dataclasses
import os
import re
import shlex
import signal
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from cxr.config import EXPERIMENTS, Experiment
from cxr.train.losses import LOSSES
from cxr.common.termination import sigterm_as_interrupt

if typing.TYPE_CHECKING:  # torch is imported only once the arguments have been checked
    from cxr.common.runtime import Runtime


def positive_int(text: str) -> int:
    return bounded_number(int, minimum=1)(text)


def non_negative_int(text: str) -> int:
    return bounded_number(int, minimum=0)(text)


def bounded_number(kind: type, minimum: float | None = None, above: float | None = None) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` of at least ``minimum`` or greater than ``above``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be greater than {above}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _experiment_default(name: str) -> str:
    """``20`` when every experiment has the same value, else each experiment's: ``--help`` shows what a run uses."""
    values = {e.name: _shown(getattr(e, name)) for e in EXPERIMENTS.values()}
    if len(set(values.values())) == 1:
        return str(next(iter(values.values())))
    return ", ".join(f"{experiment} {value}" for experiment, value in values.items())


def _shown(value: Any) -> str:
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """The experiment fields given on the command line (None: the experiment's own value)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Experiment) if "help" in f.metadata}


# Fields whose names come from a registry of the layer that uses them (torch-free to import).
REGISTRIES = {"loss": LOSSES}


def _add_hyperparameters(group: argparse._ArgumentGroup) -> None:
    """One flag per tunable field of :class:`~cxr.config.Experiment`, its help and default taken from there."""
    hints = typing.get_type_hints(Experiment)
    for field in dataclasses.fields(Experiment):
        if "help" not in field.metadata:
            continue
        flag, kind = "--" + field.name.replace("_", "-"), hints[field.name]
        help_text = f"{field.metadata['help']} (default: {_experiment_default(field.name)})"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif field.name in REGISTRIES:
            group.add_argument(flag, choices=tuple(REGISTRIES[field.name]), help=help_text)
        elif typing.get_origin(kind) is typing.Literal:
            group.add_argument(flag, choices=typing.get_args(kind), help=help_text)
        else:
            number = kind in (int, float)
            parse = bounded_number(kind, field.metadata["minimum"], field.metadata["above"]) if number else kind
            group.add_argument(flag, type=parse, metavar=field.name.upper(), help=help_text)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="dataset folder (default: $CXR_DATA_DIR, else download with kagglehub)")
    parser.add_argument("--device", help="cuda, mps, cpu or cuda:N (default: best available)")
    parser.add_argument("--out", default="assets",
                        help="results go to a new folder OUT/<experiment>/evaluations/<date-time>-<checkpoint>/ "
                             "(with --external: OUT/<experiment>/external/<folder>/), never over a run's own files "
                             "(default: assets)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _cache_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--no-cache", dest="cache", action="store_false",
                        help="decode and transform every image on every pass (no decoded-image cache)")
    parser.add_argument("--cache-dir", help="decoded-image cache folder (default: $CXR_CACHE_DIR, else ~/.cache/cxr)")


def _lung_masks(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--lung-masks", metavar="DIR",
                        help="per-image lung masks for the shortcut checks (DIR/<class>/<stem>.png or DIR/<stem>.png; "
                             "default: the geometric lung field)")


def _train_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train an experiment and evaluate it on the test split",
                                description="Train an experiment, evaluate its best epoch on the test split and "
                                            "write every result into OUT/<experiment>/.")
    what = train.add_argument_group("what to train")
    what.add_argument("experiment", choices=sorted(EXPERIMENTS), help="the named configuration (see `cxr list`)")
    _add_hyperparameters(what)
    what.add_argument("--seed", type=non_negative_int, default=42,
                      help="seed of the initialisation, the carved validation split and the batches (default: 42)")
    data = train.add_argument_group("data")
    data.add_argument("--data-dir", help="dataset folder (default: $CXR_DATA_DIR, else download with kagglehub)")
    data.add_argument("--val-source", choices=["carve", "given"], default="carve",
                      help="carve a stratified 10%% validation split out of train (default) or use Kaggle's val")
    data.add_argument("--limit", type=positive_int, metavar="N",
                      help="at most N images per class in each split, drawn with the seed (a quick run)")
    _lung_masks(data)
    _add_train_options(train.add_argument_group("images from other sources"))
    runs = train.add_argument_group("how it runs")
    runs.add_argument("--device", help="cuda, mps, cpu or cuda:N (default: best available)")
    runs.add_argument("--workers", type=non_negative_int, help="DataLoader worker processes (default: chosen per device)")
    runs.add_argument("--deterministic", action="store_true",
                      help="deterministic algorithms only (bit-identical reruns on one machine; slower on a GPU)")
    _cache_options(runs)
    runs.add_argument("--feature-cache", choices=["auto", "off"], default="auto",
                      help="auto (default): train a frozen backbone's head on cached features where nothing is augmented")
    runs.add_argument("--compile", action="store_true", help="torch.compile the model")
    runs.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False,
                      help="run every training step eagerly (default on a GPU: a fully trained network's full "
                           "batches replay CUDA graphs)")
    runs.add_argument("--splits-in-host-memory", dest="splits_on_device", action="store_false",
                      help="keep every cached split in host memory and copy each batch to the GPU through pinned "
                           "memory (default: a split under a quarter of the GPU's free memory is held on it)")
    results = train.add_argument_group("where results go")
    results.add_argument("--out", default="assets",
                         help="output folder; files go to OUT/<experiment>/, or to a new OUT/runs/<date-time>/"
                              "<experiment>/ when that folder holds another configuration's or device's results "
                              "(default: assets)")
    results.add_argument("--overwrite", action="store_true",
                         help="replace the results in OUT/<experiment>/ even when another configuration or device "
                              "wrote them")
    results.add_argument("--resume", action="store_true", help="continue from OUT/<experiment>/checkpoints/last.pt")
    results.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                         help="write no TensorBoard event files (default: OUT/<experiment>/tensorboard/)")
    results.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--add-train", nargs="+", metavar="DIR",
                       help="folders of class folders (any of the classes, named as for --external) whose images "
                            "join the training split only, after a duplicate audit against test and external images")
    group.add_argument("--add-train-holdout", type=float, metavar="FRACTION",
                       help="keep this share of each added folder's groups out of training and score it after "
                            "training as OUT/<experiment>/external/<folder>-holdout/")
    group.add_argument("--groups", nargs="+", metavar="CSV",
                       help="CSV naming each added image's group (one for all added folders, or one per folder); "
                            "default: every image its own group")
    group.add_argument("--group-column", default="group", metavar="NAME",
                       help="the groups CSV's column (default: group, one patient per group)")
    group.add_argument("--add-train-drop-duplicates", action="store_true",
                       help="leave out (and list) added images that duplicate test or external images instead of "
                            "refusing the run")
    group.add_argument("--add-train-holdout-only", action="store_true",
                       help="score the held-out part but add nothing to training: the control run of a comparison")
    group.add_argument("--external", nargs="+", metavar="DIR", default=[],
                       help="also score these folders after training, as `cxr evaluate --external` does")


def _evaluate_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint on the test split")
    evaluate.add_argument("experiment", nargs="?", choices=sorted(EXPERIMENTS),
                          help="the checkpoint's experiment (default: the one the checkpoint records)")
    evaluate.add_argument("--checkpoint", required=True, help="a checkpoint written by cxr train (best.pt)")
    _common(evaluate)

    evaluate.add_argument("--tta", action="store_true",
                          help="also report test-time augmentation (centre crop, whole square, small shifts; each mirrored)")
    evaluate.add_argument("--external", metavar="DIR",
                          help="score a folder from elsewhere (class folders, or a test/ split) instead of the test "
                               "split, after auditing it against the training images (--data-dir); results in "
                               "OUT/<experiment>/external/<folder name>/")
    evaluate.add_argument("--groups", metavar="CSV",
                          help="scores per group too: a CSV naming each image (path relative to the data folder, "
                               "or to DIR with --external, or file name) in a file column, and its group")
    evaluate.add_argument("--group-column", default="group", metavar="NAME",
                          help="the CSV's group column (default: group; e.g. source_repo)")
    _cache_options(evaluate)
    _lung_masks(evaluate)


def _predict_parser(commands: argparse._SubParsersAction) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description="Chest X-ray classification experiments.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("list", help="print the experiments and their configuration")
    _train_parser(commands)

    _evaluate_parser(commands)
    _predict_parser(commands)

    serve = commands.add_parser("serve", help="a local demo page: upload an image, see its prediction and Grad-CAM")
    serve.add_argument("--checkpoint", required=True,
                       help="a checkpoint written by cxr train (best.pt), or a folder written by cxr export")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every network)")
    serve.add_argument("--port", type=positive_int, help="port (default: 7860, or the next free one up to 7959)")
    serve.add_argument("--device", help="cuda, mps, cpu or cuda:N (default: best available)")
    export = commands.add_parser("export", help="write a checkpoint as ONNX, safetensors and model.json")
    export.add_argument("--checkpoint", required=True, help="a checkpoint written by cxr train (best.pt)")
    export.add_argument("--out", required=True, metavar="DIR", help="folder to create for the three files (and the run's model card)")
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


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cxr")
    except PackageNotFoundError:  # run from a source tree (PYTHONPATH=src) without an install
        return "unknown (not installed)"


def _print_experiments() -> None:
    for experiment in EXPERIMENTS.values():
        print(f"{experiment.name}: {experiment.summary}")
        for key, value in experiment.to_dict().items():
            if key not in ("name", "summary"):
                print(f"    {key:<16} {value}")
        print()


def _print_metrics(run: dict, out: str, name: str, folder: str | None = None) -> None:
    from cxr.evaluate import metrics
    from cxr.evaluate.breakdowns import check_sentences
    from cxr.report.run_record import test_section

    test = test_section(run)
    intervals = test.ci95

    def score(metric) -> str:
        value, interval = test.value(metric), test.interval(metric)
        if value is None:
            return "undefined"
        return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")

    scores = ", ".join(f"{m.label} {score(m)}" for m in metrics.summary_metrics())
    print(f"{name}: test {scores}" + (" (95% bootstrap intervals)" if intervals else "")
          + f"; files in {folder or f'{out}/{name}'}/")
    if test.get("who_tb_screening") is not None or "operating_points" in test:
        print(metrics.who_tb_sentence(test.get("who_tb_screening")))
    checks = run.get("shortcuts") or test.get("shortcuts") or {}
    for sentence in (checks.get("sentence"), checks.get("saliency_sentence"), *check_sentences(test.scores)):
        if sentence:
            print(sentence)


def _predict(args: argparse.Namespace) -> int:
    from cxr.inference.predict import format_table, run_predict

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
    from cxr.inference.serve import ServeError, serve

    try:
        serve(args.checkpoint, args.host, args.port, args.device)
    except ServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
def _export(args: argparse.Namespace) -> int:
    from cxr.inference.export import FILES, export_model

    description = export_model(args.checkpoint, args.out, args.force)
    sizes = ", ".join(f"{name} ({(Path(args.out) / name).stat().st_size / 2**20:.1f} MiB)" for name in FILES.values())
    difference = description["onnx"]["max_probability_difference_to_pytorch"]
    print(f"exported {description['experiment']['name']} to {args.out}/: {sizes}; "
          f"onnxruntime matches PyTorch within {difference:.1g}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from cxr.audit.data_audit import audit_dataset, format_audit, write_audit
    from cxr.common.inputs import writable_folder

    writable_folder(args.out, "--out")  # before the audit reads every file
    report = audit_dataset(args.data_dir, progress=not args.quiet, cache_dir=args.cache_dir)
    print(format_audit(report))
    print(f"\nFull report: {write_audit(report, args.out)}")
    return 0


def _external(args: argparse.Namespace) -> int:
    from cxr.external import evaluate_external
    from cxr.data.layout import visible_name

    if args.tta:
        print("error: --tta is not available with --external; evaluate the external folder without it.",
              file=sys.stderr)
        return 1
    result = evaluate_external(args.checkpoint, args.external, args.experiment, data_dir=args.data_dir, out=args.out,
                               runtime=_evaluation_runtime(args), groups=_groups(args))
    where = f"{result['experiment']}/external/{result['external']['folder']}"
    for name in result["external"]["ignored_folders"]:
        print(f"ignored folder (not a class): {visible_name(name)}")
    for path, matches in result["overlaps"]["files"].items():
        print(f"overlaps training: {path} = {'; '.join(matches)}")
    _print_metrics(result, args.out, where)
    if result["test_without_overlaps"] is not None:
        print("without the images that overlap training or validation:")
        _print_metrics({"test": result["test_without_overlaps"]}, args.out, where)
    if not result["overlaps"].get("audited", True):
        print(f"overlap not audited: {result['overlaps']['note']}")
    if result["overlaps"]["warning"]:
        print(f"WARNING: {result['overlaps']['warning']}")
    return 0


def _evaluation_runtime(args: argparse.Namespace) -> Runtime:
    """How ``cxr evaluate`` executes: its device, the decoded-image cache and progress bars."""
    from cxr.common.runtime import Runtime

    return Runtime.create(args.device, cache=args.cache, cache_dir=args.cache_dir, progress=not args.quiet)


def _groups(args: argparse.Namespace) -> tuple[str, str] | None:
    return (args.groups, args.group_column) if args.groups else None


def _resume_command(argv: Sequence[str] | None, out: str | os.PathLike | None = None) -> str:
    """The command line that continues an interrupted ``cxr train``: the same options plus --resume, and
    ``--out`` naming ``out`` (the folder the run went to when it did not replace another run's results)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if out is not None:
        args = _without_option(args, "--out") + ["--out", str(out)]
    return shlex.join(["cxr", *args, *([] if "--resume" in args else ["--resume"])])


def _without_option(args: list[str], flag: str) -> list[str]:
    kept, skip = [], False
    for token in args:
        if skip:
            skip = False
        elif token == flag:
            skip = True
        elif not token.startswith(flag + "="):
            kept.append(token)
    return kept


def _compare(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from cxr.report.compare import plot_comparison

    paths = args.metrics or sorted(Path(args.out).glob("*/metrics.json"))
    if not paths:
        print(f"error: no {args.out}/*/metrics.json found; train or evaluate an experiment first.", file=sys.stderr)
        return 1
    out_png = Path(args.out) / "comparison.png"
    plt.close(plot_comparison(paths, out_png))
    print(f"compared {len(paths)} experiment(s): {out_png}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from cxr.report.readme import ReportError, write_report

    try:
        change = write_report(args.assets, args.readme)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(change.describe(args.readme, args.assets))
    return 0


NUMBER = re.compile(r"-\d*\.?\d+(e[-+]?\d+)?", re.IGNORECASE)


def join_negative_numbers(argv: Sequence[str]) -> list[str]:
    """``--lr -1e-3`` as ``--lr=-1e-3``: argparse takes ``-1e-3`` for an option and says "expected one argument",
    where the flag's own check would say what is wrong with the value."""
    joined: list[str] = []
    for token in argv:
        previous = joined[-1] if joined else ""
        if NUMBER.fullmatch(token) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"warning: {message}\n"


def _continue_hint(args: argparse.Namespace, argv: Sequence[str] | None) -> str:
    """What to run after Ctrl-C: a training run with a saved epoch resumes, any other command starts again."""
    if args.command == "train" and (Path(args.out) / args.experiment / "checkpoints" / "last.pt").exists():
        return f"Resume with: {_resume_command(argv)}"
    return "Run it again with: " + shlex.join(["cxr", *(sys.argv[1:] if argv is None else argv)])


def main(argv: Sequence[str] | None = None) -> int:
    """``cxr``: every warning is one ``warning:`` line while it runs; SIGTERM ends it like Ctrl-C, exit 143."""
    shown, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is printed as its bytes, not a crash
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="surrogateescape")
    try:
        with sigterm_as_interrupt() as received:
            try:
                code = _main(argv)
            except KeyboardInterrupt:  # outside the command itself (the argument checks): nothing to keep
                print("\nInterrupted.", file=sys.stderr)
                code = 130
        return 128 + signal.SIGTERM if received.sigterm and code == 130 else code  # 143, as the shell reports a kill
    except BrokenPipeError:  # the output went to a pager or `head` that closed early: nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        warnings.formatwarning = shown


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(join_negative_numbers(sys.argv[1:] if argv is None else argv))
    if args.command == "list":
        _print_experiments()
        return 0
    if args.command == "report":
        return _report(args)
    from cxr.data.groups import GroupsError, check_groups_csv
    from cxr.common.inputs import InputError
    from cxr.preflight import check_arguments

    try:
        check_arguments(args)
        if args.command == "evaluate" and args.groups:  # train's --groups name the added folders' CSVs
            check_groups_csv(args.groups, args.group_column)
    except (InputError, GroupsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        return _run(args, argv)
    except KeyboardInterrupt:
        print(f"\nInterrupted. {_continue_hint(args, argv)}", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace) -> dict:
    from cxr.data.added_folders import AddedFolders
    from cxr.preflight import weights_setting
    from cxr.train.run_options import RunOptions
    from cxr.common.runtime import Runtime
    from cxr.workflow import train_experiment

    runtime = Runtime.create(args.device, workers=args.workers, compile=args.compile, cache=args.cache,
                             cache_dir=args.cache_dir, feature_cache=args.feature_cache == "auto",
                             progress=not args.quiet, cuda_graphs=args.cuda_graphs,
                             splits_on_device=args.splits_on_device)
    options = RunOptions(seed=args.seed, val_source=args.val_source, limit=args.limit, resume=args.resume,
                         overwrite=args.overwrite, deterministic=args.deterministic, tensorboard=args.tensorboard,
                         lung_masks=args.lung_masks, add_train=AddedFolders.from_args(args), external=args.external)
    return train_experiment(args.experiment, args.data_dir, args.out, runtime, options,
                            **{**hyperparameters(args), "weights": weights_setting(args.weights)})


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """The commands that need torch: imported only once the arguments have been checked."""
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from cxr.common import distributed
    from cxr.models.checkpoint import CheckpointError
    from cxr.data.layout import DatasetError
    from cxr.train.engine import TrainingError, TrainingInterrupted
    from cxr.inference.export import ExportError
    from cxr.models.classifier import WeightsError
    from cxr.workflow import evaluate_checkpoint

    # Under torchrun every process runs this: warnings and results are shown once, by rank 0.
    warnings.simplefilter("always" if distributed.is_main() else "ignore", UserWarning)
    try:
        if args.command == "train":
            run = _train(args)
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
        elif args.external:
            return _external(args)
        else:
            run = evaluate_checkpoint(args.checkpoint, args.experiment, data_dir=args.data_dir, out=args.out,
                                          runtime=_evaluation_runtime(args), tta=args.tta,
                                          lung_masks=args.lung_masks, groups=_groups(args))
        distributed.barrier()  # the other ranks wait until rank 0 has written every file
    except TrainingInterrupted as error:
        moved = getattr(error, "out", None)
        command = _resume_command(argv, moved if moved is not None and Path(moved) != Path(args.out) else None)
        if distributed.launched_by_torchrun():
            command = f"torchrun [the same torchrun options] -m {command}"
        resume = f"\nResume with: {command}" if error.saved_epochs else ""
        print(f"\n{error}{resume}", file=sys.stderr)
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
        _print_result(run, args)
        _print_other_folders(run, args.out)
    return 0


def _print_other_folders(run: dict, out: str) -> None:
    """After ``cxr train --add-train``: what was added, and the scores of the folders scored after training."""
    from cxr.data.added_folders import added_sentence
    from cxr.report.run_record import read_run_record

    record = run.get("added_training") or {}
    if added_sentence(record):
        print(added_sentence(record))
    for name in record.get("external_folders", []):
        where = f"{run['experiment']}/external/{name}"
        _print_metrics(read_run_record(Path(out) / where / "metrics.json").to_dict(), out, where)


def _print_result(run: dict, args: argparse.Namespace) -> None:
    """A run's or an evaluation's scores, then its test-time augmentation scores where it computed them."""
    name, folder = run.get("experiment", args.experiment), run.get("folder")
    _print_metrics(run, args.out, name, folder)
    tta = run.get("tta") or run.get("test", {}).get("tta")
    if tta:
        print(f"with test-time augmentation ({tta['views']}):")
        _print_metrics({"test": tta}, args.out, name, folder)


if __name__ == "__main__":
    sys.exit(main())
