"""A classifier that never sees the anatomy: how far the file and the image's border alone get.

In the Kaggle set the class is also the source (paediatric Kermany images, adult COVID-19 collections
with figures from papers, adult TB collections), so a model may learn where an image came from instead
of what its lungs show. This baseline puts a number on that: a gradient-boosting classifier
(scikit-learn's ``HistGradientBoostingClassifier``, ``random_state=0``) trained on the training split
from these per-image statistics only, and scored on the test split with the models' metrics and
bootstrap intervals. Every score in README is read against it.

File: format (JPEG 0, PNG 1, DICOM 2, other 3), width, height, aspect ratio (width / height), bits per
sample, channels, bytes per pixel (file size over width x height: how hard the encoder compressed it)
and file size in kB.

Border (the decoded square every model input comes from, :func:`cxr.data.imageio.decode_image`, at the
audit's cache side, *outside* the lung field of :mod:`cxr.data.lung_field`): mean and standard deviation of
the intensity, an 8-bin histogram (fractions), the fractions near black (<= 10) and near white (>= 245),
and "text-like" corners: in each corner (a sixth of the side), the fraction of pixels whose Sobel
gradient exceeds 64 grey levels; the mean and the largest of the four. Nothing inside the lung field
enters, so what the baseline scores is not pathology.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import sobel
from sklearn.ensemble import HistGradientBoostingClassifier
from threadpoolctl import threadpool_limits

from cxr.evaluate import metrics
from cxr.evaluate.classification_report import classification_metrics
from cxr.data.cache import cache_split
from cxr.data.dataset import Split
from cxr.data.layout import CLASSES
from cxr.data.imageio import dicom_header, is_dicom
from cxr.data.lung_field import geometric_lung_field

FILE_FEATURES = ("format", "width", "height", "aspect_ratio", "bits_per_sample", "channels", "bytes_per_pixel",
                 "file_kb")
HISTOGRAM_BINS = 8
BORDER_FEATURES = ("border_mean", "border_std", *(f"border_hist_{i}" for i in range(HISTOGRAM_BINS)),
                   "border_near_black", "border_near_white", "corner_edges_mean", "corner_edges_max")
FEATURES = FILE_FEATURES + BORDER_FEATURES
FORMATS = {"JPEG": 0, "PNG": 1, "DICOM": 2}
BITS = {"1": 1, "L": 8, "P": 8, "RGB": 8, "RGBA": 8, "LA": 8, "CMYK": 8, "YCbCr": 8, "I;16": 16, "I;16B": 16,
        "I;16L": 16, "I": 32, "F": 32}
CORNER_FRACTION = 1 / 6
EDGE_THRESHOLD = 64.0
NEAR_BLACK, NEAR_WHITE = 10, 245


def file_statistics(path: str | os.PathLike) -> list[float]:
    """The file-level features of one image, read from its header (no pixels decoded)."""
    size = os.path.getsize(path)
    if is_dicom(path):
        width, height, mode = dicom_header(path)  # mode: "DICOM MONOCHROME2 12-bit"
        depth = mode.split()[-1].split("-")[0]
        bits, file_format, channels = float(depth) if depth.isdigit() else 16.0, FORMATS["DICOM"], 1
    else:
        with Image.open(path) as image:
            width, height, mode, name = image.width, image.height, image.mode, image.format
        bits, file_format, channels = float(BITS.get(mode, 8)), FORMATS.get(name, 3), len(image.getbands())
    return [float(file_format), float(width), float(height), width / height, bits, float(channels),
            size / (width * height), size / 1024]


def border_statistics(square: np.ndarray, lung: np.ndarray) -> list[float]:
    """The border features of one decoded uint8 square; ``lung`` marks the pixels left out."""
    border = square[~lung].astype(np.float64)
    histogram = np.bincount(np.minimum(border.astype(int) * HISTOGRAM_BINS // 256, HISTOGRAM_BINS - 1),
                            minlength=HISTOGRAM_BINS) / max(len(border), 1)
    side = square.shape[0]
    corner = max(2, round(side * CORNER_FRACTION))
    edges = []
    for rows in (slice(0, corner), slice(side - corner, side)):
        for columns in (slice(0, corner), slice(side - corner, side)):
            patch = square[rows, columns].astype(np.float64)
            gradient = np.hypot(sobel(patch, 0), sobel(patch, 1)) / 4  # Sobel's kernel sums to 4: grey levels per pixel
            edges.append(float((gradient > EDGE_THRESHOLD).mean()))
    return [border.mean(), border.std(), *histogram, (border <= NEAR_BLACK).mean(), (border >= NEAR_WHITE).mean(),
            float(np.mean(edges)), float(np.max(edges))]


def feature_matrix(split: Split, side: int, cache_dir: str | os.PathLike | None = None,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(N, len(FEATURES))`` features and the labels of the images of ``split`` that decode (the
    squares come from the decoded-image cache, which the audit has filled at this ``side``)."""
    cached = cache_split(split, side, cache_dir, progress=progress, description="decode (baseline)")
    lung = geometric_lung_field(side)
    rows = [file_statistics(path) + border_statistics(square, lung)
            for path, square in zip(cached.split.paths, cached.images)]
    features = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(FEATURES))
    return features, np.asarray(cached.split.labels, dtype=np.int64)


def make_classifier() -> HistGradientBoostingClassifier:
    """Small and fixed: the same features and labels always give the same predictions."""
    return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=0)


def class_log_probabilities(classifier: HistGradientBoostingClassifier, features: np.ndarray) -> np.ndarray:
    """Log-probabilities over every class (a class absent from training gets probability 0), usable as logits."""
    probabilities = np.zeros((len(features), len(CLASSES)))
    probabilities[:, classifier.classes_] = classifier.predict_proba(features)
    return np.log(np.clip(probabilities, 1e-12, None))


def baseline_report(train: Split, test: Split, side: int, cache_dir: str | os.PathLike | None = None,
                    progress: bool = False) -> dict[str, Any] | None:
    """Train on ``train``, score on ``test``: the test metrics (those of the models, with bootstrap
    intervals) and what the classifier saw. None when either split has no image to learn or score."""
    train_x, train_y = feature_matrix(train, side, cache_dir, progress)
    test_x, test_y = feature_matrix(test, side, cache_dir, progress)
    if len(train_x) == 0 or len(test_x) == 0 or len(np.unique(train_y)) < 2:
        return None
    classifier = make_classifier()
    # one OpenMP thread: on 2 shared CPU cores, all threads made a 120-image fit take 9.5 s instead of 0.24 s
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", UserWarning)  # tiny synthetic splits: too few samples per bin
        classifier.fit(train_x, train_y)
        logits = class_log_probabilities(classifier, test_x)
    test_metrics = classification_metrics(logits, test_y, CLASSES)
    test_metrics["ci95"] = metrics.bootstrap_ci(test_y, logits.argmax(1), CLASSES)
    return {
        "classifier": "HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=0)",
        "features": list(FEATURES),
        "sees": "file header and the decoded square outside the geometric lung field (cxr.data.lung_field)",
        "square_side": side,
        "train_images": len(train_x),
        "test_images": len(test_x),
        "chance_accuracy": float(np.bincount(test_y, minlength=len(CLASSES)).max() / len(test_y)),
        "test": test_metrics,
    }


def format_baseline(report: dict[str, Any] | None) -> list[str]:
    """Lines for ``cxr audit``'s printed report."""
    if report is None:
        return ["Shortcut baseline: not computed (it needs a train and a test split with images)"]
    test, ci95 = report["test"], report["test"]["ci95"]

    def score(key: str) -> str:
        low, high = ci95[key]
        return f"{test[key]:.3f} [{low:.3f}, {high:.3f}]"

    recalls = ", ".join(f"{name} {values['recall']:.3f}" for name, values in test["per_class"].items())
    return [f"Shortcut baseline (file and border statistics only, never the lung field; {len(report['features'])} "
            f"features, trained on {report['train_images']} images of "
            f"{report.get('trained_on', 'the train split')}): test accuracy {score('accuracy')}, "
            f"macro-F1 {score('macro_f1')}, balanced accuracy {score('balanced_accuracy')} (95% bootstrap); "
            f"recall {recalls}; majority class alone: accuracy {report['chance_accuracy']:.3f}"]
