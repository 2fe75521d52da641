"""The whole job in a few calls: prepare the data, train an experiment, evaluate it on the test split
and write every asset. The CLI and the notebooks are thin front ends over these functions."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.special import softmax

from cxr.audit import checks
from cxr.common import distributed
from cxr.common import runlock
from cxr.evaluate import shortcuts
from cxr.evaluate import uncertainty
from cxr.data.added_folders import check_added
from cxr.train.added_training import AddedTraining, add_to_training
from cxr.audit.data_audit import audit_summary, audit_training_splits
from cxr.models.checkpoint import load_checkpoint
from cxr.evaluate.classification_report import classification_metrics, report_text, write_json
from cxr.config import Experiment, experiment_from_dict, get_experiment
from cxr.data.dataset import DataSplits, check_limit, load_splits, warn_skipped
from cxr.data.layout import locate_dataset
from cxr.data.layout import CLASSES
from cxr.train.engine import TrainingInterrupted, fit, make_deterministic, predict, seed_everything
from cxr.external import evaluate_external
from cxr.evaluate.figures import plot_confusion, plot_history, plot_predictions, plot_roc, unwritten_figures
from cxr.data.groups import read_groups
from cxr.inference.trained_model import check_finite_rows, load_trained_model
from cxr.data.lung_field import find_lung_masks
from cxr.evaluate.metrics import operating_points, who_tb_screening
from cxr.train.losses import check_loss_name
from cxr.report.model_card import CARD_FILE, write_model_card
from cxr.train.pipeline import build_dataset, make_loader
from cxr.models.local_weights import weights_provenance
from cxr.models.classifier import Classifier, build_model, check_weights
from cxr.preflight import check_image_size
from cxr.data.provenance import dataset_info, git_commit
from cxr.train.run_options import RunOptions
from cxr.report.run_record import (AnyRecord, DatasetInfo, EvaluationRecord, RunRecord, RunRecordError, TestScores, Timings,
                         WeightsFile, read_run_record)
from cxr.common.runtime import Runtime, device_name
from cxr.train.tensorboard_log import RunLog

ASSET_FILES = {
    "curves": "curves.png",
    "confusion_matrix": "confusion_matrix.png",
    "predictions": "predictions.png",
    "report_text": "classification_report.txt",
    "report_json": "classification_report.json",
    "history": "history.csv",
    "metrics": "metrics.json",
    "reliability": "reliability.png",
    "roc": "roc.png",
    "model_card": CARD_FILE,
    "cam": "cam.png",
    "shortcuts": shortcuts.FIGURE,
}


def prepare_data(
    data_dir: str | os.PathLike | None = None, val_source: str = "carve", val_fraction: float = 0.1, seed: int = 42,
    limit: int | None = None,
) -> DataSplits:
    """Locate (or download) the dataset and scan its splits; ``limit`` keeps at most that many images per
    class in each split (a quick run)."""
    check_limit(limit)  # before a download or a scan
    return load_splits(locate_dataset(data_dir), val_source=val_source, val_fraction=val_fraction, seed=seed,
                       limit=limit)


def uncertainty_report(
    model: Classifier, experiment: Experiment, splits: DataSplits, out_dir: Path, runtime: Runtime,
    preprocessing: dict[str, Any], logits: np.ndarray, labels: np.ndarray, tta: bool = False,
) -> dict[str, Any]:
    """What goes beside the checks of :mod:`cxr.audit.checks` (scores with intervals, calibration, ...): each class's
    operating point fixed on the validation split (90% sensitivity) with the WHO TB check and the ROC figure,
    logit adjustment with its strength chosen on the validation
    split, test-time augmentation (with ``tta``) and the Grad-CAM grid."""
    val_set, _, _ = build_dataset(splits.val, experiment, preprocessing, runtime, False, "decode val")
    val_loader = make_loader(val_set, experiment.batch_size, False, runtime)
    val_logits, val_labels = predict(model, val_loader, runtime, "val")
    title = f"{experiment.name}: test split"
    probabilities = softmax(logits.astype(np.float64), axis=1)
    points = operating_points(val_labels, softmax(val_logits.astype(np.float64), axis=1), labels,
                                      probabilities, CLASSES)
    plt.close(plot_roc(labels, probabilities, CLASSES, out_dir / ASSET_FILES["roc"],
                       f"{title}: ROC (dots: operating points fixed on validation)", points))
    report = {
        "operating_points": points,
        "who_tb_screening": who_tb_screening(points),
        "logit_adjusted": uncertainty.logit_adjustment_report(val_logits, val_labels, logits, labels,
                                                              splits.train.labels, CLASSES),
    }
    if tta:  # the views are cut from the same decoded squares as the plain evaluation
        views = uncertainty.TTAViews.from_preprocessing(preprocessing)
        tta_set, _, _ = build_dataset(splits.test, experiment, preprocessing, runtime, False, "decode test",
                                      transform=views)
        tta_loader = make_loader(tta_set, max(1, experiment.batch_size // 4), False, runtime)
        tta_logits, tta_labels = uncertainty.predict_tta(model, tta_loader, runtime, "test TTA")
        report["tta"] = {"views": f"{', '.join(views.names)}; each also mirrored",
                         **uncertainty.summary_with_ci(tta_logits, tta_labels, CLASSES)}
    try:
        from cxr.evaluate import cam  # imported here: the grad-cam package is missing on some bare GPU machines
    except ImportError as error:
        warnings.warn(f"Grad-CAM figure skipped ({error}); `pip install grad-cam` adds it.", stacklevel=2)
    else:
        plt.close(cam.plot_cam_grid(model, splits.test.paths, labels, softmax(logits, axis=1), CLASSES, preprocessing,
                                    out_dir / ASSET_FILES["cam"], title=f"{experiment.name}: Grad-CAM on the test split"))
    return report


def evaluate_model(
    model: Classifier, experiment: Experiment, splits: DataSplits, out_dir: Path, runtime: Runtime,
    preprocessing: dict[str, Any], tta: bool = False, lung_masks: str | os.PathLike | None = None,
    groups: tuple[str | os.PathLike, str] | None = None,
) -> dict[str, Any]:
    """Evaluate on the test split and write the report (text, JSON), confusion matrix and prediction grid,
    and run the checks of :mod:`cxr.audit.checks` (``lung_masks``: a folder of per-image lung masks instead of the
    geometric lung field; ``groups``: (CSV, column) for subgroup scores); the lung checks are returned under
    ``"shortcuts"``.
    With ``runtime.cache`` the test images come from the decoded-image cache.
    In a torchrun job every rank predicts its share of the test split and gets all test predictions;
    rank 0 alone then runs the uncertainty report and writes the files, the others return the test
    metrics (equal to rank 0's)."""
    out_dir = Path(out_dir)
    runtime = runtime.replace(progress=runtime.progress and distributed.is_main())
    with distributed.main_first():  # one process per node decodes into the image cache, the others read it
        test_set, test_split, _ = build_dataset(splits.test, experiment, preprocessing, runtime, False, "decode test")
    warn_skipped(test_split.skipped)
    splits = dataclasses.replace(splits, test=test_split)  # without any image the cache could not decode
    loader = make_loader(test_set, experiment.batch_size, False, runtime, shard=True)
    runtime.prepare_model(model)
    with runtime.one_off():
        logits, labels = predict(model, loader, runtime, "test")
        check_finite_rows(logits, splits.test.paths)
        metrics = classification_metrics(logits, labels, CLASSES)
        if not distributed.is_main():
            return metrics
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics.update(checks.run_checks(checks.Evidence(
            model, splits.test, logits, labels, preprocessing, runtime, out_dir, experiment.batch_size,
            title=f"{experiment.name}: test split", train=splits.train, lung_masks=lung_masks,
            groups=read_groups(*groups, splits.test.paths, splits.root) if groups else None,
            group_column=groups[1] if groups else "group")))
        metrics.update(uncertainty_report(model, experiment, splits, out_dir, runtime, preprocessing, logits, labels,
                                          tta))
    write_json(metrics, out_dir / ASSET_FILES["report_json"])
    (out_dir / ASSET_FILES["report_text"]).write_text(report_text(metrics, CLASSES))
    title = f"{experiment.name}: test split"
    figures = [
        plot_confusion(labels, logits.argmax(1), CLASSES, out_dir / ASSET_FILES["confusion_matrix"], title),
        plot_predictions(splits.test.paths, labels, softmax(logits, axis=1), CLASSES,
                         out_dir / ASSET_FILES["predictions"], title=title),
    ]
    for figure in figures:
        plt.close(figure)
    np.savez_compressed(out_dir / "test_logits.npz", logits=logits, labels=labels)
    return metrics


def results_replaced(out_dir: Path, experiment: Experiment, device: str) -> str | None:
    """What an earlier run left in ``out_dir`` and how it differs from this one, or None when there is nothing:
    a run rewrites every file of its folder, and committed results (README shows them) are lost silently
    otherwise."""
    earlier = _earlier_metrics(out_dir)
    if earlier is None:
        return None
    if earlier is UNREADABLE:
        return f"{out_dir}/ holds an unreadable metrics.json; this run replaces it."
    same = _same_provenance(earlier, experiment, device)
    return (f"{out_dir}/ holds the results of an earlier run ({_describe_run(earlier)}"
            f"{'; the same configuration and device' if same else '; another configuration or device'}); this run "
            "replaces them. To keep them, stop now (Ctrl-C) and pass another output folder (--out DIR), or commit "
            "them first.")


def _earlier_metrics(out_dir: Path) -> AnyRecord | None:
    """The record a run left in ``out_dir``: None when there is none, :data:`UNREADABLE` when it cannot be read."""
    path = out_dir / ASSET_FILES["metrics"]
    if not path.is_file():
        return None
    try:
        return read_run_record(path)
    except RunRecordError:
        return UNREADABLE


UNREADABLE = RunRecord()  # what _earlier_metrics gives for a metrics.json that cannot be read


def _describe_run(earlier: AnyRecord) -> str:
    planned = getattr(earlier, "config", {}).get("epochs", "?")
    date = getattr(earlier, "date", None)
    return (f"{getattr(earlier, 'device', None) or 'unknown device'}, {getattr(earlier, 'epochs_run', None) or '?'} "
            f"of {planned} epochs, weights {getattr(earlier, 'weights', None) or '?'}, "
            f"{str(date or 'undated')[:10]}")


def _same_provenance(earlier: AnyRecord, experiment: Experiment, device: str) -> bool:
    return getattr(earlier, "config", None) == experiment.to_dict() and getattr(earlier, "device", None) == device


def run_folder(out: str | os.PathLike, experiment: Experiment, device: str, overwrite: bool = False,
               resume: bool = False) -> tuple[Path, str | None]:
    """Where a training run writes, and what to tell the user about it: ``out/<name>/``, unless that folder holds
    results of another configuration or device (e.g. committed GPU results) and neither ``overwrite`` nor
    ``resume`` is given: then a new folder ``out/runs/<UTC date-time>/<name>/``, so nothing is replaced by a
    default. A rerun of the same configuration on the same device replaces its folder, with a warning."""
    out_dir = Path(out) / experiment.name
    if resume:
        return out_dir, None
    replaced = results_replaced(out_dir, experiment, device)
    earlier = _earlier_metrics(out_dir)
    if replaced is None or overwrite or (earlier is not None and _same_provenance(earlier, experiment, device)):
        return out_dir, replaced
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    new_dir = Path(out) / "runs" / stamp / experiment.name
    kept = ("an unreadable metrics.json" if earlier is None or earlier is UNREADABLE
            else f"the results of another run ({_describe_run(earlier)})")
    return new_dir, (f"{out_dir}/ holds {kept}; they are kept and this run writes into {new_dir}/ instead "
                     "(--overwrite replaces them; --out DIR chooses another folder).")


def _same_on_every_rank(folder: Path) -> Path:
    """Rank 0's choice of folder, on every rank of a torchrun job (the ranks' clocks may differ)."""
    if not distributed.is_distributed():
        return folder
    shared = [str(folder)]
    torch.distributed.broadcast_object_list(shared, src=0)
    return Path(shared[0])


def train_experiment(
    name: str,
    data_dir: str | os.PathLike | None = None,
    out: str | os.PathLike = "assets",
    runtime: Runtime | None = None,
    options: RunOptions = RunOptions(),
    splits: DataSplits | None = None,
    model: Classifier | None = None,
    on_epoch_end: Callable[[list[dict[str, float]]], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train the named experiment, evaluate its best checkpoint on the test split and write every asset into
    ``out/<name>/`` (or a new folder: :func:`run_folder`). ``runtime`` decides how the run executes (default:
    :meth:`Runtime.create`), ``options`` what it does beside its configuration (:class:`RunOptions`: seed,
    resume, added and external folders, ...; its ``limit`` is ignored when ``splits`` are given), ``overrides``
    replace configuration values (epochs, batch_size, ...). ``model``, when given (see
    :func:`build_experiment_model`), is the one that trains. The data is audited first (duplicates and
    train/test leakage are warned about and summarised in metrics.json, beside the shortcut baseline); lung
    masks and added folders are checked before training; held-out parts of added folders and external folders
    are scored after it into ``out/<name>/external/``. Returns metrics.json's contents, with ``"folder"``.

    Under ``torchrun`` every process calls this (see :mod:`cxr.common.distributed`); rank 0 audits the data and
    writes every file, the other ranks return only the test metrics."""
    started = time.perf_counter()
    experiment = get_experiment(name, **overrides)
    check_image_size(experiment.image_size, experiment.arch)
    check_loss_name(experiment.loss)
    if model is None:  # a local weights file that does not fit is refused before anything is written
        check_weights(experiment.arch, experiment.weights, len(CLASSES), experiment.image_size)
    check_added(options.add_train, options.external, options.seed)
    if options.deterministic:
        make_deterministic()
    runtime = runtime or Runtime.create()
    runtime = runtime.replace(device=distributed.setup(runtime.device))
    main_rank = distributed.is_main()
    out_dir, replaced = run_folder(out, experiment, device_name(runtime.device), options.overwrite, options.resume)
    out_dir = _same_on_every_rank(out_dir)
    if replaced and main_rank:
        warnings.warn(replaced, stacklevel=2)
    # The folder is held before the data is scanned: a second run into it, or an --out that cannot be
    # written, is refused at once, not after the audit.
    with runlock.hold_folder(out_dir, "cxr train") if main_rank else contextlib.nullcontext():
        splits = splits or prepare_data(data_dir, val_source=options.val_source, seed=options.seed,
                                        limit=options.limit)
        added, data_audit = _audited_data(splits, runtime, options)
        metrics = _train_and_report(experiment, added.splits, out_dir, runtime, options, data_audit, on_epoch_end,
                                    started, model)
        if main_rank:
            score_other_folders(added, out_dir / "checkpoints" / "best.pt", experiment.name, out_dir.parent,
                                runtime)
        return {**metrics, "folder": str(out_dir)}


def _audited_data(splits: DataSplits, runtime: Runtime, options: RunOptions,
                  ) -> tuple[AddedTraining, dict[str, Any] | None]:
    """The run's splits with the added folders, its lung masks checked (a missing or misfit mask fails now, not
    after training) and, on rank 0, the audit of every file (its warnings shown; None on the other ranks)."""
    with distributed.main_first():
        added = add_to_training(splits, options.add_train, options.external, options.seed, runtime.progress,
                                runtime.cache_dir)
    if options.lung_masks is not None:
        find_lung_masks(added.splits.test.paths, options.lung_masks)
    if not distributed.is_main():  # the audit reads every file: one process is enough
        return added, None
    data_audit = audit_training_splits(added.splits, runtime.progress, runtime.cache_dir)
    for message in data_audit["warnings"]:
        warnings.warn(message, stacklevel=3)  # shown at train_experiment's caller, as before
    return added, data_audit


def score_other_folders(added: AddedTraining, checkpoint: Path, name: str, out: str | os.PathLike,
                        runtime: Runtime) -> None:
    """Score the best checkpoint on each held-out part of an added folder and each ``--external`` folder, as
    ``cxr evaluate --external`` does, into ``out/<name>/external/<folder>/``."""
    for results_name, folder, images in added.holdouts:
        evaluate_external(checkpoint, folder, name, out=out, runtime=runtime, images=images,
                          results_name=results_name, splits=added.splits)
    for folder in added.externals:
        evaluate_external(checkpoint, folder, name, out=out, runtime=runtime, splits=added.splits)


def _train_and_report(experiment: Experiment, splits: DataSplits, out_dir: Path, runtime: Runtime,
                      options: RunOptions, data_audit: dict[str, Any] | None,
                      on_epoch_end: Callable[[list[dict[str, float]]], None] | None, started: float,
                      model: Classifier | None) -> dict[str, Any]:
    """:func:`train_experiment` once the folder is held and the data audited: fit, evaluate, write metrics.json."""
    main_rank = distributed.is_main()
    board = RunLog(out_dir / "tensorboard", options.resume) if main_rank and options.tensorboard else None
    try:
        result = fit(experiment, splits, out_dir, runtime, seed=options.seed, resume=options.resume,
                     on_epoch_end=board.on_epoch_end(on_epoch_end) if board else on_epoch_end, model=model)
    except TrainingInterrupted as error:
        error.out = out_dir.parent  # the --out that resumes it, when the run went to a new folder
        raise
    with unwritten_figures() as unwritten:  # a full disk costs figures (one warning each), never the scores
        if main_rank:
            plt.close(plot_history(result.history, out_dir / ASSET_FILES["curves"], experiment.name))
        state = load_checkpoint(result.best_checkpoint, experiment=experiment.name)
        test = evaluate_model(result.model, experiment, splits, out_dir, result.runtime, state["preprocessing"],
                              lung_masks=options.lung_masks)
    if not main_rank:
        return {"experiment": experiment.name, "test": test}
    record = RunRecord(
        experiment=experiment.name, config=experiment.to_dict(), weights=experiment.weights,
        weights_file=_weights_file(experiment.weights), epochs_run=len(result.history),
        best_epoch=result.best_epoch, stopped_early=result.stopped_early, seed=options.seed, deterministic=options.deterministic,
        dataset=DatasetInfo(**dataset_info(splits)), added_training=splits.added, audit=audit_summary(data_audit),
        shortcut_baseline=data_audit.get("shortcut_baseline"), device=device_name(result.runtime.device),
        mixed_precision=result.runtime.precision(), pipeline=result.extra.get("pipeline"), torch=torch.__version__,
        python=platform.python_version(),
        timings=Timings(round(result.train_seconds, 2), round(time.perf_counter() - started, 2)),
        git_commit=git_commit(), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        best_val={k: v for k, v in result.history[result.best_epoch - 1].items() if k.startswith("val_")},
        shortcuts=test.pop("shortcuts", None), test=TestScores(test), files=dict(ASSET_FILES),
        figures_not_written=unwritten,
    )
    record.write(out_dir / ASSET_FILES["metrics"])
    write_model_card(out_dir, record)
    if board is not None:
        test_logits = np.load(out_dir / "test_logits.npz")
        board.finish(record, test_logits["labels"], test_logits["logits"].argmax(1))
    return record.to_dict()


def _weights_file(weights: str | None) -> WeightsFile | None:
    provenance = weights_provenance(weights)
    return WeightsFile(**provenance) if provenance else None


def build_experiment_model(name: str, seed: int = 42, **overrides: Any) -> Classifier:
    """The experiment's model as :func:`train_experiment` would build it (same seed, so the same new head),
    for a notebook that shows the model and then passes it to ``train_experiment(model=...)`` to train it:
    the weights are built and loaded once."""
    experiment = get_experiment(name, **overrides)
    seed_everything(seed)
    return build_model(experiment.arch, len(CLASSES), experiment.weights, experiment.trainable_blocks,
                       experiment.image_size)



def evaluate_checkpoint(
    checkpoint: str | os.PathLike, experiment: str | None = None, data_dir: str | os.PathLike | None = None,
    out: str | os.PathLike = "assets", runtime: Runtime | None = None, tta: bool = False,
    lung_masks: str | os.PathLike | None = None, groups: tuple[str | os.PathLike, str] | None = None,
) -> dict[str, Any]:
    """Evaluate a saved checkpoint on the test split and write the evaluation's own record into a new folder,
    ``out/<name>/evaluations/<date-time>-<checkpoint>/``: its ``metrics.json`` (test scores, with ``tta`` the
    test-time augmentation scores, the shortcut checks; with ``lung_masks`` from that folder; with ``groups``
    = (CSV, column), scores per group), report files,
    figures and model card. A run's own files are never touched: an evaluation of last.pt beside best.pt's
    results would otherwise mix two checkpoints in one folder. ``runtime``: how it executes (default:
    :meth:`Runtime.create` on the best device, images read through the decoded-image cache).
    Returns the test scores, with ``"experiment"`` and ``"folder"`` (where the record is)."""
    started = time.perf_counter()
    model, state = load_trained_model(checkpoint, experiment)
    config = experiment_from_dict(state["experiment"])
    runtime = runtime or Runtime.create()
    runtime = runtime.replace(device=distributed.setup(runtime.device))
    main_rank = distributed.is_main()
    out_dir = evaluation_folder(Path(out) / config.name, checkpoint) if main_rank else Path(out) / config.name
    with runlock.hold_folder(out_dir, "cxr evaluate") if main_rank else contextlib.nullcontext():
        splits = prepare_data(data_dir, seed=state.get("seed", 42))
        if lung_masks is not None:
            find_lung_masks(splits.test.paths, lung_masks)
        if groups is not None:
            read_groups(*groups, splits.test.paths, splits.root)  # an unlisted image fails now, not after scoring
        test = evaluate_model(model, config, splits, out_dir, runtime, state["preprocessing"], tta, lung_masks,
                              groups)
        if main_rank:
            record = evaluation_record(state, checkpoint, splits, test, runtime, time.perf_counter() - started)
            record.write(out_dir / ASSET_FILES["metrics"])
            write_model_card(out_dir, record)
    return {"experiment": config.name, **test, "folder": str(out_dir)}


def evaluation_folder(run_dir: Path, checkpoint: str | os.PathLike) -> Path:
    """A new folder ``run_dir/evaluations/<UTC date-time>-<checkpoint stem>/`` (a suffix when one exists)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = run_dir / "evaluations" / f"{stamp}-{Path(checkpoint).stem}"
    folder, number = base, 1
    while folder.exists():
        number += 1
        folder = base.with_name(f"{base.name}-{number}")
    return folder


def evaluation_record(state: dict[str, Any], checkpoint: str | os.PathLike, splits: DataSplits,
                      test: dict[str, Any], runtime: Runtime, seconds: float) -> EvaluationRecord:
    """The ``metrics.json`` of one ``cxr evaluate``: only what this evaluation and its checkpoint say, in the
    shape ``cxr report``, ``cxr compare`` and the model card read (never the run's recipe or scores)."""
    config = state["experiment"]
    test = dict(test)
    shortcuts = test.pop("shortcuts", None)
    return EvaluationRecord(
        experiment=config["name"], evaluated_checkpoint=str(checkpoint), checkpoint_epoch=state.get("epoch"),
        config=config, weights=config.get("weights"), seed=state.get("seed"),
        dataset=DatasetInfo(**dataset_info(splits)), device=device_name(runtime.device), torch=torch.__version__,
        python=platform.python_version(), wall_seconds=round(seconds, 2), git_commit=git_commit(),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), test=TestScores(test),
        shortcuts=shortcuts, files={k: v for k, v in ASSET_FILES.items() if k not in ("curves", "history")},
    )
