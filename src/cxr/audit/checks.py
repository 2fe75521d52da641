"""One list of evaluation checks, run for the test split and for external folders alike.

Every check is a function ``check(evidence, results) -> dict | None`` in ``CHECKS``, paired with the
section of the results it fills ("" for the scores section itself, e.g. ``"shortcuts"`` for the lung
checks); ``results`` holds what the checks before it found. A check that cannot run on this evidence (no
training split for the probes, no groups given) returns None. A new check is one function and one entry.

What each one costs on the CPU is dominated by forward passes: the masked views make 9 passes over the
scored images (as is, the lung field and three equal-area controls, each hidden and shown alone), the
probes 3 over at most ``lung_evidence.PROBE_TRAIN_PER_CLASS`` training images per class, saliency
2 x ``shortcuts.CAM_IMAGES`` Grad-CAM maps.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
from scipy.special import softmax
from torch import nn

from cxr.evaluate import breakdowns
from cxr.evaluate import lung_evidence
from cxr.evaluate import metrics
from cxr.evaluate import shortcuts
from cxr.evaluate import uncertainty
from cxr.data.cache import cache_split
from cxr.evaluate.classification_report import classification_metrics
from cxr.data.dataset import Split
from cxr.data.layout import CLASSES
from cxr.data.imageio import decode_image
from cxr.data.lung_field import ELLIPSES, lung_fields
from cxr.data.preprocessing import Preprocessing
from cxr.common.runtime import Runtime


@dataclass
class Evidence:
    """What the checks look at: the model, the scored images (the test split or an external folder) with
    the plain evaluation's logits, and what else there is (a training split, groups)."""

    model: nn.Module
    split: Split
    logits: np.ndarray
    labels: np.ndarray
    preprocessing: dict[str, Any]
    runtime: Runtime
    out_dir: Path
    batch_size: int
    title: str = ""
    kind: str = "test"  # "test" or "external"
    train: Split | None = None
    lung_masks: str | os.PathLike | None = None
    groups: Sequence[str] | None = None
    group_column: str = "group"
    classes: Sequence[str] = CLASSES
    cam_images: int = shortcuts.CAM_IMAGES
    _outputs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @cached_property
    def probabilities(self) -> np.ndarray:
        return softmax(self.logits.astype(np.float64), axis=1)

    @cached_property
    def recipe(self) -> Preprocessing:
        return Preprocessing.from_dict(self.preprocessing)

    @cached_property
    def squares(self) -> np.ndarray:
        return shortcuts.decoded_squares(self.split, self.recipe.square_side, self.runtime)

    @cached_property
    def lung(self) -> np.ndarray:
        return lung_fields(self.split.paths, self.recipe.square_side, self.lung_masks)

    def outputs(self, view: str) -> tuple[np.ndarray, np.ndarray]:
        """Pooled features and logits of the scored images in one view (computed once)."""
        if view not in self._outputs:
            self._outputs[view] = lung_evidence.view_outputs(self.model, self.squares, self.lung, view,
                                                             self.preprocessing, self.runtime, self.batch_size)
        return self._outputs[view]


Check = Callable[[Evidence, dict[str, Any]], "dict[str, Any] | None"]
MASKED_VIEWS = ("lungs_hidden", "lungs_only", *(f"{p}_{m}" for m in ("hidden", "only")
                                                for p in lung_evidence.PLACEMENTS))


def scores(evidence: Evidence, results: dict[str, Any]) -> dict[str, Any]:
    """The table's metrics with bootstrap intervals (AUROC included)."""
    found = classification_metrics(evidence.logits, evidence.labels, evidence.classes)
    found["images"] = int(len(evidence.labels))
    found["classes_present"] = [c for k, c in enumerate(evidence.classes) if (evidence.labels == k).any()]
    found["ci95"] = metrics.bootstrap_ci(evidence.labels, evidence.logits.argmax(1), evidence.classes,
                                         evidence.probabilities)
    return found


def calibration(evidence: Evidence, results: dict[str, Any]) -> dict[str, Any]:
    """ECE, and the reliability diagram beside the other figures."""
    return {"ece": uncertainty.calibration_report(evidence.logits, evidence.labels,
                                                  evidence.out_dir / "reliability.png", evidence.title)}


def pairwise(evidence: Evidence, results: dict[str, Any]) -> dict[str, Any]:
    return breakdowns.pairwise_auroc(evidence.labels, evidence.probabilities, evidence.classes)


def class_shares(evidence: Evidence, results: dict[str, Any]) -> dict[str, Any]:
    shares = breakdowns.prediction_shares(evidence.labels, evidence.logits.argmax(1), evidence.classes)
    absent = [c for c in evidence.classes if c not in shares]
    return {"shares": shares, "absent": absent, "sentence": breakdowns.shares_sentence(shares, absent)}


def masked_views(evidence: Evidence, results: dict[str, Any]) -> dict[str, Any]:
    """Macro-F1 with the lung field, and with equal-area controls, hidden and shown alone."""
    classes, labels = evidence.classes, evidence.labels
    views = {"as_is": uncertainty.summary_with_ci(evidence.logits, labels, classes)}
    predictions, areas = {"as_is": evidence.logits.argmax(1)}, {}
    for view in MASKED_VIEWS:
        logits = evidence.outputs(view)[1]
        predictions[view] = logits.argmax(1)
        views[view] = uncertainty.summary_with_ci(logits, labels, classes)
    lung = shortcuts.input_masks(evidence.lung[:1], evidence.preprocessing)
    for placement in lung_evidence.PLACEMENTS:  # equal but where the outside is smaller than the lung field
        areas[placement] = float(lung_evidence.control_region(lung, placement).sum() / max(int(lung.sum()), 1))
    return {
        "lung_field": f"masks from {evidence.lung_masks}" if evidence.lung_masks else
                      "geometric: ellipses (centre x, centre y, half-width, half-height) " + str(ELLIPSES),
        "fill": "0 after normalisation (the normalisation mean of each channel)",
        "views": {v: {**views[v], "description": shortcuts.VIEWS.get(v, v.replace("_", " "))}
                  for v in ("as_is", "lungs_hidden", "lungs_only")},
        "chance_macro_f1": 1 / len(classes),
        "controls": {"geometry": lung_evidence.CONTROL_GEOMETRY, "area_over_lung_field_first_image": areas,
                     "views": {v: views[v] for v in MASKED_VIEWS[2:]},
                     **lung_evidence.controlled_drops(labels, predictions, len(classes))},
    }


def probes(evidence: Evidence, results: dict[str, Any]) -> dict[str, Any] | None:
    """Train-on-view linear probes: fit on the training split in each view, scored on these images in it."""
    if evidence.train is None or not len(evidence.train):
        return {"probes": None}
    chosen = lung_evidence.probe_training_images(evidence.train.labels)
    side = evidence.recipe.square_side
    train_squares, train = _decoded(evidence.train.subset(chosen), side, evidence.runtime)
    train_lung = lung_fields(train.paths, side, evidence.lung_masks)
    train_features, test_features = {}, {}
    for view in lung_evidence.PROBE_VIEWS:
        train_features[view] = lung_evidence.view_outputs(evidence.model, train_squares, train_lung, view,
                                                          evidence.preprocessing, evidence.runtime,
                                                          evidence.batch_size)[0]
        test_features[view] = evidence.outputs(view)[0]
    return {"probes": lung_evidence.probe_scores(train_features, np.asarray(train.labels), test_features,
                                                 evidence.labels, evidence.classes)}


def _decoded(split: Split, side: int, runtime: Runtime) -> tuple[np.ndarray, Split]:
    """Decoded squares of ``split`` and the split of the images they are (the cache leaves out any it cannot decode)."""
    if runtime.cache:
        cached = cache_split(split, side, runtime.cache_dir, progress=runtime.progress, description="decode probe train")
        return cached.images, cached.split
    return np.stack([decode_image(path, side) for path in split.paths]), split


def saliency(evidence: Evidence, results: dict[str, Any]) -> dict[str, Any]:
    """Grad-CAM mass in the lung field, with the model-randomisation check (:mod:`cxr.evaluate.shortcuts`)."""
    try:
        found = shortcuts.saliency_report(evidence.model, evidence.squares, evidence.lung, evidence.labels,
                                          evidence.logits.argmax(1), evidence.preprocessing, evidence.classes,
                                          evidence.cam_images)
    except ImportError as error:  # the grad-cam package is missing on some bare GPU machines
        warnings.warn(f"Grad-CAM saliency check skipped ({error}); `pip install grad-cam` adds it.", stacklevel=2)
        found = None
    return {"saliency": found, "saliency_sentence": shortcuts.saliency_sentence(found)}


def verdict(evidence: Evidence, results: dict[str, Any]) -> dict[str, Any]:
    """The sentences that follow from the controlled drops and the probes, and ``shortcuts.png``."""
    checks = results["shortcuts"]
    found = lung_evidence.verdicts(checks["views"]["as_is"]["macro_f1"], checks["controls"], checks.get("probes"),
                                   checks["chance_macro_f1"])
    right = np.flatnonzero(evidence.logits.argmax(1) == evidence.labels)
    example = int(right[0]) if len(right) else 0
    plt.close(shortcuts.plot_shortcuts(evidence.squares[example], evidence.lung[example], checks,
                                       evidence.preprocessing, evidence.out_dir / shortcuts.FIGURE, evidence.title))
    return {**found, "figure": shortcuts.FIGURE}


def groups(evidence: Evidence, results: dict[str, Any]) -> dict[str, Any] | None:
    """Scores per group of images (``--groups CSV``), small groups named."""
    if evidence.groups is None:
        return None
    found = breakdowns.subgroup_scores(evidence.labels, evidence.probabilities, evidence.groups, evidence.classes)
    return {"column": evidence.group_column, **found,
            "sentence": breakdowns.subgroup_sentence(found, evidence.group_column)}


def baseline(evidence: Evidence, results: dict[str, Any]) -> dict[str, Any] | None:
    """The no-anatomy baseline (:mod:`cxr.audit.source_baseline`) fit on the training split and scored on an
    external folder beside the model; the test split's is the audit's (``shortcut_baseline`` in metrics.json)."""
    if evidence.kind != "external" or evidence.train is None:
        return None
    from cxr.audit.data_audit import AUDIT_SIDE
    from cxr.audit.source_baseline import baseline_report

    return baseline_report(evidence.train, evidence.split, AUDIT_SIDE, evidence.runtime.cache_dir)


CHECKS: tuple[tuple[str, Check], ...] = (
    ("", scores),
    ("", calibration),
    ("pairwise_auroc", pairwise),
    ("class_shares", class_shares),
    ("shortcuts", masked_views),
    ("shortcuts", probes),
    ("shortcuts", saliency),
    ("shortcuts", verdict),
    ("groups", groups),
    ("shortcut_baseline", baseline),
)


def run_checks(evidence: Evidence, checks: Sequence[tuple[str, Check]] = CHECKS) -> dict[str, Any]:
    """Every check in turn; each result lands in its section ("" : the scores section itself)."""
    evidence.out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for section, check in checks:
        found = check(evidence, results)
        if found is None:
            continue
        if section:
            results.setdefault(section, {}).update(found)
        else:
            results.update(found)
    return results
