"""External validation: score a trained checkpoint on a folder of images from elsewhere.

``cxr evaluate EXPERIMENT --checkpoint C --external DIR``. DIR holds class folders, directly or under a
``test/`` folder; their names are matched case-insensitively and with common spellings (``TB``,
``COVID-19``). Before scoring, DIR is audited against the checkpoint's own training and validation images
(exact and near duplicates, :mod:`cxr.audit.data_audit`): a copy of a training image measures memory, not
generalisation, so the scores are given with and without the overlapping files. The training data is
``--data-dir``, else the folder the checkpoint recorded; where neither is there the folder is scored anyway,
marked "overlap not audited". DIR may hold some classes only: the checks of :mod:`cxr.audit.checks` then say
which share of each class was called a class the folder does not hold. Results go to
``<out>/<experiment>/external/<folder name>/`` and never replace the run's internal test results.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from scipy.special import softmax

from cxr.audit.data_audit import audit_splits
from cxr.evaluate.classification_report import classification_metrics, report_text
from cxr.config import experiment_from_dict
from cxr.evaluate.breakdowns import pairwise_auroc
from cxr.audit.checks import Evidence, run_checks
from cxr.data.dataset import DataSplits, Split, load_splits, scan_external, warn_skipped
from cxr.train.engine import predict
from cxr.evaluate.figures import plot_confusion, plot_roc
from cxr.data.groups import read_groups
from cxr.inference.trained_model import load_trained_model
from cxr.data.layout import CLASSES, locate_dataset, relative_path, visible_name
from cxr.evaluate.metrics import bootstrap_ci, operating_points, who_tb_screening
from cxr.report.model_card import write_model_card
from cxr.train.pipeline import build_dataset, make_loader
from cxr.report.run_record import ExternalRecord, TestScores
from cxr.common.runtime import Runtime



def training_overlaps(report: dict[str, Any]) -> dict[str, list[str]]:
    """``{external file: [train/val files showing the same picture]}`` from an audit of the splits
    ``train``, ``val`` and ``external``: exact copies (same bytes) and near duplicates alike."""
    overlaps: dict[str, list[str]] = {}
    for group in report["duplicates"]["groups"] + report["near_duplicates"]["groups"]:
        seen = [f"{f['split']}: {f['path']}" for f in group["files"] if f["split"] in ("train", "val")]
        for file in group["files"]:
            if file["split"] == "external" and seen:
                overlaps.setdefault(file["path"], [])
                overlaps[file["path"]] += [s for s in seen if s not in overlaps[file["path"]]]
    return dict(sorted(overlaps.items()))


def operating(logits: np.ndarray, labels: np.ndarray,
              thresholds_from: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    """The operating points fixed on the checkpoint's validation split, read on these images (none without
    the training data)."""
    if thresholds_from is None:
        return {"operating_points": None, "who_tb_screening": None}
    points = operating_points(*thresholds_from, labels, softmax(logits.astype(np.float64), axis=1), CLASSES)
    return {"operating_points": points, "who_tb_screening": who_tb_screening(points)}


def score(logits: np.ndarray, labels: np.ndarray,
          thresholds_from: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    """A test section of metrics.json for a subset of the external predictions (without the overlaps):
    the table's metrics with bootstrap intervals, the pairwise AUROC and the operating points."""
    probabilities = softmax(logits.astype(np.float64), axis=1)
    scores = classification_metrics(logits, labels, CLASSES)
    scores["images"] = int(len(labels))
    scores["classes_present"] = [c for k, c in enumerate(CLASSES) if (labels == k).any()]
    scores["ci95"] = bootstrap_ci(labels, logits.argmax(1), CLASSES, probabilities)
    scores["pairwise_auroc"] = pairwise_auroc(labels, probabilities, CLASSES)
    return {**scores, **operating(logits, labels, thresholds_from)}


def training_splits(data_dir: str | os.PathLike | None, state: dict[str, Any]) -> tuple[DataSplits | None, str | None]:
    """The checkpoint's training data for the overlap audit, the thresholds and the probes: ``data_dir``, else
    the folder the checkpoint recorded, else ``$CXR_DATA_DIR``; never downloaded. (None, why) when none is there."""
    recorded = (state.get("data") or {}).get("root")
    source = data_dir or (recorded if recorded and Path(recorded).is_dir() else None) or os.environ.get("CXR_DATA_DIR")
    if not source:
        where = (f"the checkpoint's training data folder {recorded!r} is gone" if recorded else
                 "the checkpoint does not record its training data folder")
        return None, (f"{where}: --data-dir is needed for the overlap audit; the folder is scored anyway, overlap "
                      "not audited (and no validation thresholds, probes or baseline).")
    data = state.get("data") or {}
    splits = load_splits(locate_dataset(source), val_source=data.get("val_source", "carve"), seed=state.get("seed", 42))
    return splits, None


def audited_overlaps(splits: DataSplits | None, external: Split, runtime: Runtime,
                     progress: bool) -> dict[str, Any]:
    """``{"files": {external file: [train/val files]}, "audited": bool}`` (nothing audited without the data)."""
    if splits is None:
        return {"files": {}, "audited": False}
    audit = audit_splits({"train": splits.train, "val": splits.val, "external": external}, splits.root, progress,
                         {"source": "external validation"}, runtime.cache_dir)
    return {"files": training_overlaps(audit), "audited": True}


def overlap_warning(overlapping: int, total: int) -> str | None:
    """What to say about external images that the model was trained or validated on."""
    if overlapping == 0:
        return None
    if overlapping == total:
        return (f"EVERY external image ({total}) also appears in the checkpoint's training or validation data: "
                "these scores measure memory, not generalisation.")
    return (f"{overlapping} of {total} external images also appear in the checkpoint's training or validation "
            "data; scores are given with and without them.")


def evaluate_external(
    checkpoint: str | os.PathLike, folder: str | os.PathLike, experiment: str | None = None,
    data_dir: str | os.PathLike | None = None, out: str | os.PathLike = "assets", runtime: Runtime | None = None,
    groups: tuple[str | os.PathLike, str] | None = None,
    images: Split | None = None, results_name: str | None = None, splits: DataSplits | None = None,
) -> dict[str, Any]:
    """Audit ``folder`` against the checkpoint's training and validation images (the run's own ``splits``, or
    :func:`training_splits`), score the checkpoint on it with and without the overlapping files, run the checks
    of :mod:`cxr.audit.checks` (``groups``: (CSV, column), paths relative to ``folder``) and write metrics.json, the
    report and figures into ``out/<experiment>/external/<results_name>/`` (default: the folder's name).
    ``images``: the part of ``folder`` to score, already scanned (the held-out part of a folder added to
    training, :mod:`cxr.train.added_training`). ``runtime``: how it executes (default: :meth:`Runtime.create`)."""
    external, ignored, base = scan_external(folder) if images is None else (images, [], Path(folder))
    warn_skipped(external.skipped)
    for name in ignored:
        warnings.warn(f"external folder {visible_name(name)} is not a class; its images are ignored.", stacklevel=2)
    if groups is not None:
        read_groups(*groups, external.paths, Path(folder))  # an unlisted image fails before the model loads
    model, state = load_trained_model(checkpoint, experiment)
    config = experiment_from_dict(state["experiment"])
    runtime = runtime or Runtime.create()
    not_audited = None
    if splits is None:
        splits, not_audited = training_splits(data_dir, state)
    if not_audited:
        warnings.warn(not_audited, stacklevel=2)
    overlaps = audited_overlaps(splits, external, runtime, runtime.progress)
    external_set, external, _ = build_dataset(external, config, state["preprocessing"], runtime, False,
                                              "decode external")
    runtime.prepare_model(model)
    with runtime.one_off():
        logits, labels = predict(model, make_loader(external_set, config.batch_size, False, runtime), runtime,
                                 "external")
        thresholds_from = validation_probabilities(model, config, splits, state, runtime)
        name = results_name or Path(folder).resolve().name
        out_dir = Path(out) / config.name / "external" / name
        test = run_checks(Evidence(model, external, logits, labels, state["preprocessing"], runtime, out_dir,
                                   config.batch_size, f"{config.name}: external {name}",
                                   "external", splits.train if splits else None, groups=read_groups(
                                       *groups, external.paths, Path(folder)) if groups else None,
                                   group_column=groups[1] if groups else "group"))
    result = external_result(config.name, checkpoint, folder, base, ignored, external, splits, overlaps,
                             not_audited, logits, labels, thresholds_from, test)
    result.external["folder"] = name
    write_external(result, out_dir, logits, labels)
    run_metrics = Path(out) / config.name / "metrics.json"
    if run_metrics.is_file():  # the run's model card lists its external results
        write_model_card(run_metrics.parent)
    return result.to_dict()


def validation_probabilities(model: Any, config: Any, splits: DataSplits | None, state: dict[str, Any],
                             runtime: Runtime) -> tuple[np.ndarray, np.ndarray] | None:
    """The validation labels and probabilities the operating points are fixed on (None without the data)."""
    if splits is None:
        return None
    val_set, _, _ = build_dataset(splits.val, config, state["preprocessing"], runtime, False, "decode val")
    val_logits, val_labels = predict(model, make_loader(val_set, config.batch_size, False, runtime), runtime, "val")
    return val_labels, softmax(val_logits.astype(np.float64), axis=1)


def external_result(name: str, checkpoint: str | os.PathLike, folder: str | os.PathLike, base: Path,
                    ignored: list[str], external: Split, splits: DataSplits | None, overlaps: dict[str, Any],
                    not_audited: str | None, logits: np.ndarray, labels: np.ndarray,
                    thresholds_from: tuple[np.ndarray, np.ndarray] | None, test: dict[str, Any]) -> ExternalRecord:
    """The external metrics.json: what was scored, against what training data, the overlaps and the checks."""
    root = splits.root if splits else None
    overlapping = np.array([relative_path(p, root) in overlaps["files"] if root else False for p in external.paths],
                           dtype=bool)
    message = overlap_warning(int(overlapping.sum()), len(labels))
    if message:
        warnings.warn(message, stacklevel=3)
    kept = ~overlapping
    return ExternalRecord(
        experiment=name,
        checkpoint=str(checkpoint),
        external={"folder": Path(folder).resolve().name, "root": str(Path(folder).resolve()),
                  "classes_from": str(base), "ignored_folders": ignored,
                  "absent_classes": [c for k, c in enumerate(CLASSES) if not (labels == k).any()],
                  "skipped_files": [{"path": str(p), "reason": why} for p, why in external.skipped]},
        trained_on=({"root": str(splits.root), "val_source": splits.val_source, "counts": splits.counts()}
                    if splits else None),
        overlaps={"files": overlaps["files"], "count": int(overlapping.sum()), "warning": message,
                  "audited": overlaps["audited"], "note": None if overlaps["audited"] else not_audited},
        test=TestScores({**{k: v for k, v in test.items() if k not in ("shortcuts", "shortcut_baseline")},
                         **operating(logits, labels, thresholds_from)}),
        test_without_overlaps=(TestScores(score(logits[kept], labels[kept], thresholds_from))
                               if overlapping.any() and kept.any() else None),
        shortcuts=test.get("shortcuts"),
        shortcut_baseline=test.get("shortcut_baseline"),
    )


def write_external(result: ExternalRecord, out_dir: Path, logits: np.ndarray, labels: np.ndarray) -> None:
    """metrics.json, the text report, the confusion matrix and the ROC curves of one external evaluation."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result.write(out_dir / "metrics.json")
    (out_dir / "classification_report.txt").write_text(report_text(result.test.scores, CLASSES))
    title = f"{result.experiment}: external {result.folder}"
    probabilities = softmax(logits.astype(np.float64), axis=1)
    for figure in (plot_confusion(labels, logits.argmax(1), CLASSES, out_dir / "confusion_matrix.png", title),
                   plot_roc(labels, probabilities, CLASSES, out_dir / "roc.png", title,
                             result.test["operating_points"])):
        plt.close(figure)
    np.savez_compressed(out_dir / "test_logits.npz", logits=logits, labels=labels)
