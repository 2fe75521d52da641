"""The whole job in a few calls: prepare the data, train an experiment, evaluate it on the test split
and write every asset. The CLI and the notebooks are thin front ends over these functions."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.special import softmax

from . import distributed, reporting, uncertainty
from .audit import audit_summary, audit_training_splits
from .checkpoint import load_checkpoint
from .config import Experiment, experiment_from_dict, get_experiment
from .data import CLASSES, KAGGLE_HANDLE, DataSplits, check_limit, load_splits, locate_dataset, warn_skipped
from .engine import build_dataset, fit, make_deterministic, make_loader, predict, seed_everything
from .models import Classifier, build_model
from .runtime import Runtime, device_name
from .tensorboard_log import RunLog

ASSET_FILES = {
    "curves": "curves.png",
    "confusion_matrix": "confusion_matrix.png",
    "predictions": "predictions.png",
    "report_text": "classification_report.txt",
    "report_json": "classification_report.json",
    "history": "history.csv",
    "metrics": "metrics.json",
    "reliability": "reliability.png",
    "cam": "cam.png",
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


def git_commit(where: str | os.PathLike | None = None) -> str | None:
    """The commit of the checkout holding ``where`` (default: this package), with ``-dirty`` when tracked
    files other than the results under ``assets/`` differ from it. Results are left out because re-running
    an experiment rewrites its committed results before it asks. ``$CXR_COMMIT``, when set, wins: a copy of
    the tree on a GPU machine may carry another commit's git metadata. None outside a git checkout."""
    if os.environ.get("CXR_COMMIT"):
        return os.environ["CXR_COMMIT"]
    where = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=where, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)assets"], cwd=where, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def dataset_info(splits: DataSplits) -> dict[str, Any]:
    kaggle = "kagglehub" in str(splits.root) or KAGGLE_HANDLE.split("/")[1] in str(splits.root)
    return {
        "name": KAGGLE_HANDLE if kaggle else splits.root.name,
        "root": str(splits.root),
        "val_source": splits.val_source,
        "counts": splits.counts(),
        "limit_per_class": splits.limit,
        "skipped_files": len(splits.skipped),
    }


def uncertainty_report(
    model: Classifier, experiment: Experiment, splits: DataSplits, out_dir: Path, runtime: Runtime,
    preprocessing: dict[str, Any], logits: np.ndarray, labels: np.ndarray, tta: bool = False,
) -> dict[str, Any]:
    """What goes beside the test metrics: bootstrap 95% intervals, calibration (ECE and a reliability
    diagram), logit adjustment with its strength chosen on the validation split, test-time augmentation
    (with ``tta``) and the Grad-CAM grid."""
    val_set, _, _ = build_dataset(splits.val, experiment, preprocessing, runtime, False, "decode val")
    val_loader = make_loader(val_set, experiment.batch_size, False, runtime)
    val_logits, val_labels = predict(model, val_loader, runtime, "val")
    title = f"{experiment.name}: test split"
    report = {
        "ci95": uncertainty.bootstrap_ci(labels, logits.argmax(1), CLASSES),
        "ece": uncertainty.calibration_report(logits, labels, out_dir / ASSET_FILES["reliability"], title),
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
        from . import cam  # imported here: the grad-cam package is missing on some bare GPU machines
    except ImportError as error:
        warnings.warn(f"Grad-CAM figure skipped ({error}); `pip install grad-cam` adds it.", stacklevel=2)
    else:
        plt.close(cam.plot_cam_grid(model, splits.test.paths, labels, softmax(logits, axis=1), CLASSES, preprocessing,
                                    out_dir / ASSET_FILES["cam"], title=f"{experiment.name}: Grad-CAM on the test split"))
    return report


def evaluate_model(
    model: Classifier, experiment: Experiment, splits: DataSplits, out_dir: Path, runtime: Runtime,
    preprocessing: dict[str, Any], tta: bool = False,
) -> dict[str, Any]:
    """Evaluate on the test split and write the report (text, JSON), confusion matrix and prediction grid.
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
        metrics = reporting.classification_metrics(logits, labels, CLASSES)
        if not distributed.is_main():
            return metrics
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics.update(uncertainty_report(model, experiment, splits, out_dir, runtime, preprocessing, logits, labels,
                                          tta))
    reporting.write_json(metrics, out_dir / ASSET_FILES["report_json"])
    (out_dir / ASSET_FILES["report_text"]).write_text(reporting.report_text(metrics, CLASSES))
    title = f"{experiment.name}: test split"
    figures = [
        reporting.plot_confusion(labels, logits.argmax(1), CLASSES, out_dir / ASSET_FILES["confusion_matrix"], title),
        reporting.plot_predictions(splits.test.paths, labels, softmax(logits, axis=1), CLASSES,
                                   out_dir / ASSET_FILES["predictions"], title=title),
    ]
    for figure in figures:
        plt.close(figure)
    np.savez_compressed(out_dir / "test_logits.npz", logits=logits, labels=labels)
    return metrics


def train_experiment(
    name: str,
    data_dir: str | os.PathLike | None = None,
    out: str | os.PathLike = "assets",
    device: str | None = None,
    seed: int = 42,
    val_source: str = "carve",
    workers: int | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[list[dict[str, float]]], None] | None = None,
    splits: DataSplits | None = None,
    deterministic: bool = False,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    compile: bool = False,
    feature_cache: bool = True,
    runtime: Runtime | None = None,
    tensorboard: bool = True,
    cuda_graphs: bool | None = None,
    limit: int | None = None,
    model: Classifier | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train the named experiment, evaluate its best checkpoint on the test split and write every
    asset into ``out/<name>/``. ``overrides`` replace configuration values (epochs, batch_size, ...);
    ``deterministic`` allows only deterministic kernels. ``runtime`` decides how the run executes; without
    it one is made for ``device`` from ``workers``, ``cache`` (the decoded-image cache), ``cache_dir``,
    ``compile``, ``feature_cache``, ``progress`` and ``cuda_graphs`` (None: on CUDA) (:meth:`Runtime.create`).
    ``tensorboard`` also writes TensorBoard event files into ``out/<name>/tensorboard/``. ``limit`` keeps at
    most that many images per class in each split (ignored when ``splits`` is given). ``model``, when given
    (see :func:`build_experiment_model`), is the one that trains, instead of a new one. The data is audited
    first: duplicates and train/test leakage are warned about and summarised in metrics.json. Returns the
    contents of ``metrics.json``.

    Under ``torchrun`` every process calls this (see :mod:`cxr.distributed`); rank 0 audits the data and
    writes every file, the other ranks return only the test metrics."""
    started = time.perf_counter()
    experiment = get_experiment(name, **overrides)
    if deterministic:
        make_deterministic()
    runtime = runtime or Runtime.create(device, workers=workers, compile=compile, cache=cache, cache_dir=cache_dir,
                                        feature_cache=feature_cache, progress=progress, cuda_graphs=cuda_graphs)
    runtime = runtime.replace(device=distributed.setup(runtime.device))
    main_rank = distributed.is_main()
    splits = splits or prepare_data(data_dir, val_source=val_source, seed=seed, limit=limit)
    out_dir = Path(out) / experiment.name
    if main_rank:  # the audit reads every file: one process is enough
        data_audit = audit_training_splits(splits, runtime.progress, runtime.cache_dir)
        for message in data_audit["warnings"]:
            warnings.warn(message, stacklevel=2)
        out_dir.mkdir(parents=True, exist_ok=True)
    board = RunLog(out_dir / "tensorboard", resume) if main_rank and tensorboard else None
    result = fit(experiment, splits, out_dir, runtime, seed=seed, resume=resume,
                 on_epoch_end=board.on_epoch_end(on_epoch_end) if board else on_epoch_end, model=model)
    if main_rank:
        plt.close(reporting.plot_history(result.history, out_dir / ASSET_FILES["curves"], experiment.name))
    state = load_checkpoint(result.best_checkpoint, experiment=experiment.name)
    test = evaluate_model(result.model, experiment, splits, out_dir, result.runtime, state["preprocessing"])
    if not main_rank:
        return {"experiment": experiment.name, "test": test}
    metrics = {
        "experiment": experiment.name,
        "config": experiment.to_dict(),
        "weights": experiment.weights,
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "seed": seed,
        "deterministic": deterministic,
        "dataset": dataset_info(splits),
        "audit": audit_summary(data_audit),
        "device": device_name(result.runtime.device),
        "mixed_precision": result.runtime.precision(),
        "pipeline": result.extra.get("pipeline"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "train_seconds": round(result.train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "best_val": {k: v for k, v in result.history[result.best_epoch - 1].items() if k.startswith("val_")},
        "test": test,
        "files": {k: v for k, v in ASSET_FILES.items()},
    }
    reporting.write_json(metrics, out_dir / ASSET_FILES["metrics"])
    if board is not None:
        test_logits = np.load(out_dir / "test_logits.npz")
        board.finish(metrics, test_logits["labels"], test_logits["logits"].argmax(1))
    return metrics


def build_experiment_model(name: str, seed: int = 42, **overrides: Any) -> Classifier:
    """The experiment's model as :func:`train_experiment` would build it (same seed, so the same new head),
    for a notebook that shows the model and then passes it to ``train_experiment(model=...)`` to train it:
    the weights are built and loaded once."""
    experiment = get_experiment(name, **overrides)
    seed_everything(seed)
    return build_model(experiment.arch, len(CLASSES), experiment.weights, experiment.freeze_backbone,
                       experiment.image_size)


def load_trained_model(checkpoint: str | os.PathLike, experiment: str | None = None) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild a trained classifier from a checkpoint (refusing one of another experiment)."""
    state = load_checkpoint(checkpoint, experiment=experiment, classes=CLASSES)
    config = experiment_from_dict(state["experiment"])
    model = build_model(config.arch, len(state["classes"]), "none", config.freeze_backbone, config.image_size)
    model.load_state_dict(state["model"])
    return model.eval(), state


def evaluate_checkpoint(
    checkpoint: str | os.PathLike, experiment: str | None = None, data_dir: str | os.PathLike | None = None,
    out: str | os.PathLike = "assets", device: str | None = None, progress: bool = True, tta: bool = False,
    cache: bool = True, cache_dir: str | os.PathLike | None = None, runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Evaluate a saved checkpoint on the test split and write the report files into ``out/<name>/``
    (with ``tta``, also the test-time augmentation results). ``cache``: read the images through the
    decoded-image cache; ``runtime``, when given, replaces ``device``, ``progress``, ``cache``
    and ``cache_dir``."""
    model, state = load_trained_model(checkpoint, experiment)
    config = experiment_from_dict(state["experiment"])
    runtime = runtime or Runtime.create(device, cache=cache, cache_dir=cache_dir, progress=progress)
    runtime = runtime.replace(device=distributed.setup(runtime.device))
    splits = prepare_data(data_dir, seed=state.get("seed", 42))
    return evaluate_model(model, config, splits, Path(out) / config.name, runtime, state["preprocessing"], tta)
