"""How sure are the numbers: bootstrap intervals, calibration, prior-shift correction and test-time augmentation.

A test split of a few hundred images gives metrics that move by several points from one draw to the
next; the intervals say how much. Calibration says whether a predicted 0.9 means right 9 times in 10.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import softmax
from torch import nn
from torch.utils.data import DataLoader
from cxr.common.progress import tqdm

from cxr.evaluate.figures import save_figure
from cxr.evaluate import metrics
from cxr.data.augment import EvalTransform
from cxr.config import AUGMENTATION
from cxr.data.preprocessing import Preprocessing
from cxr.common.runtime import Runtime

CALIBRATION_BINS = 15
# Negative strengths undo part of the class-weighted loss (back towards the training prior), positive
# ones push further towards rare classes (Menon et al., 2021); 0 leaves the logits unchanged.
TAU_GRID = tuple(np.round(np.arange(-1.0, 2.0001, 0.1), 2))


def calibration_bins(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS
) -> dict[str, np.ndarray]:
    """Top-label confidence against accuracy in ``bins`` equal-width bins over (0, 1]: per bin the
    image count, mean confidence and accuracy (NaN where a bin is empty)."""
    confidence = probabilities.max(1)
    correct = (probabilities.argmax(1) == np.asarray(labels)).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # bin b holds (b/bins, (b+1)/bins]
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return {"edges": np.linspace(0, 1, bins + 1), "count": count, "confidence": mean_confidence, "accuracy": accuracy}


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """ECE (Guo et al., 2017): the image-weighted mean gap between confidence and accuracy over the bins."""
    table = calibration_bins(probabilities, labels, bins)
    filled = table["count"] > 0
    gaps = np.abs(table["accuracy"][filled] - table["confidence"][filled])
    return float((table["count"][filled] * gaps).sum() / table["count"].sum())


def plot_reliability(probabilities: np.ndarray, labels: np.ndarray, path: Path | None = None, title: str = "",
                     bins: int = CALIBRATION_BINS) -> plt.Figure:
    """Reliability diagram (accuracy per confidence bin against the diagonal) above a histogram of confidences."""
    table = calibration_bins(probabilities, labels, bins)
    ece = expected_calibration_error(probabilities, labels, bins)
    centres, width = (table["edges"][:-1] + table["edges"][1:]) / 2, 1 / bins
    figure, (diagram, histogram) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                                gridspec_kw={"height_ratios": [3, 1]})
    filled = table["count"] > 0
    diagram.bar(centres[filled], table["accuracy"][filled], width=width, edgecolor="black", label="accuracy")
    diagram.bar(centres[filled], table["confidence"][filled] - table["accuracy"][filled],
                bottom=table["accuracy"][filled], width=width, color="crimson", alpha=0.3, edgecolor="crimson",
                label="gap to confidence")
    diagram.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    diagram.set(ylabel="accuracy", ylim=(0, 1), xlim=(0, 1), title=f"{title}  (ECE {ece:.3f}, {bins} bins)".strip())
    diagram.legend(loc="upper left")
    histogram.bar(centres, table["count"], width=width, edgecolor="black", color="grey")
    histogram.set(xlabel="confidence (top-class probability)", ylabel="images")
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path, dpi=120)
    return figure


def class_prior(train_labels: Sequence[int], num_classes: int) -> np.ndarray:
    """Class frequencies of the training split (a class without images counts as one, so its log is finite)."""
    counts = np.maximum(np.bincount(np.asarray(train_labels), minlength=num_classes), 1)
    return counts / counts.sum()


def adjust_logits(logits: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """Post-hoc logit adjustment: subtract ``tau * log(prior)``."""
    return logits - tau * np.log(prior)


def choose_tau(val_logits: np.ndarray, val_labels: np.ndarray, prior: np.ndarray, classes: Sequence[str],
               grid: Sequence[float] = TAU_GRID) -> tuple[float, dict[float, float]]:
    """The adjustment strength with the best validation macro-F1 (ties go to the weakest adjustment),
    and the validation macro-F1 of every strength tried. Never looks at the test split."""
    scores = {float(tau): metrics.point_scores(val_labels, adjust_logits(val_logits, prior, tau).argmax(1),
                                               classes)["macro_f1"] for tau in grid}
    best = max(scores.values())
    tau = min((t for t, s in scores.items() if s >= best - 1e-12), key=abs)
    return tau, scores


def logit_adjustment_report(
    val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray, test_labels: np.ndarray,
    train_labels: Sequence[int], classes: Sequence[str], seed: int = 0,
) -> dict[str, Any]:
    """Choose tau on validation, then report the test split without and with the adjustment."""
    prior = class_prior(train_labels, len(classes))
    tau, val_scores = choose_tau(val_logits, val_labels, prior, classes)
    adjusted = adjust_logits(test_logits, prior, tau).argmax(1)
    return {
        "tau": tau,
        "chosen_on": "validation macro-F1",
        "train_prior": {c: float(p) for c, p in zip(classes, prior)},
        "val_macro_f1": {"without": val_scores[0.0], "with": val_scores[tau]},
        "without": metrics.point_scores(test_labels, test_logits.argmax(1), classes),
        "with": {**metrics.point_scores(test_labels, adjusted, classes),
                 "ci95": metrics.bootstrap_ci(test_labels, adjusted, classes, seed=seed)},
    }


def calibration_report(test_logits: np.ndarray, test_labels: np.ndarray, path: Path | None = None,
                       title: str = "") -> float:
    """ECE of the test predictions; with ``path``, also the reliability diagram."""
    probabilities = softmax(test_logits.astype(np.float64), axis=1)
    if path is not None:
        plt.close(plot_reliability(probabilities, test_labels, path, title))
    return expected_calibration_error(probabilities, test_labels)


@dataclass(frozen=True)
class TTAViews:
    """Eight views of each decoded square, all inside what training augmentation shows: the evaluation
    crop (view 0, exactly the plain evaluation input), the whole square resized (the largest random crop)
    and the evaluation crop shifted left and right by up to 4% (the largest shift), each also mirrored.
    A ``(B, 1, S, S)`` uint8 batch becomes ``(B, 8, 3, image_size, image_size)``."""

    image_size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shift: float = AUGMENTATION.affine.translate  # the largest shift training augmentation makes
    names = ("centre crop", "whole square", "shifted left", "shifted right")

    @classmethod
    def from_preprocessing(cls, preprocessing: dict[str, Any]) -> TTAViews:
        recipe = Preprocessing.from_dict(preprocessing)
        return cls(recipe.image_size, recipe.resize, recipe.mean, recipe.std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        full = EvalTransform(self.resize, self.resize, self.mean, self.std)(images)  # normalised, not cropped
        size, top = self.image_size, int(round((self.resize - self.image_size) / 2.0))
        shift = min(round(self.shift * size), top, self.resize - size - top)
        crops = [full[..., top:top + size, left:left + size] for left in (top, top - shift, top + shift)]
        crops.insert(1, F.interpolate(full, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
        return torch.stack(crops + [crop.flip(-1) for crop in crops], 1)


@torch.inference_mode()
def average_view_probabilities(model: nn.Module, views: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """(B, V, C, H, W) views -> (B, K) class probabilities averaged over the V views."""
    batch, count = views.shape[:2]
    with runtime.autocast():
        logits = model(runtime.to_device(views.flatten(0, 1))).float()
    return logits.softmax(1).view(batch, count, -1).mean(1)


@torch.inference_mode()
def predict_tta(model: nn.Module, loader: DataLoader, runtime: Runtime,
                description: str = "tta") -> tuple[np.ndarray, np.ndarray]:
    """Like ``engine.predict`` for a loader of (B, V, C, H, W) views: the class probabilities are
    averaged over the views and returned as log-probabilities, so they work wherever logits do."""
    model.eval()
    all_log_probs, all_labels = [], []
    for views, labels in tqdm(loader, desc=description, leave=False, disable=not runtime.progress):
        probabilities = average_view_probabilities(model, views, runtime)
        all_log_probs.append(probabilities.clamp_min(1e-12).log().cpu())
        all_labels.append(torch.as_tensor(labels).cpu())  # a DeviceLoader's labels live on the device
    return torch.cat(all_log_probs).numpy(), torch.cat(all_labels).numpy()


def summary_with_ci(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Point scores, their bootstrap intervals and the ECE of one set of predictions (used for TTA)."""
    predictions = logits.argmax(1)
    return {**metrics.point_scores(labels, predictions, classes),
            "ci95": metrics.bootstrap_ci(labels, predictions, classes, seed=seed),
            "ece": expected_calibration_error(softmax(logits.astype(np.float64), axis=1), labels)}

