"""Scores broken down: by pair of classes, by true class, by group of images.

Pairwise AUROC: for every pair of classes present, the images of those two classes only, scored as
scikit-learn's one-vs-one AUROC scores a pair (Hand and Till, 2001): the mean of the AUROC of class a's
probability for "is a" and of class b's probability for "is b". In this dataset NORMAL and PNEUMONIA
share one source (the Kermany children) while COVID19 and TUBERCULOSIS come from adults' collections, so
NORMAL vs PNEUMONIA is the one score the source cannot explain (``SAME_SOURCE_PAIRS``).

Prediction shares: per true class, the share of its images predicted as each class, absent classes
included: an external folder of NORMAL and PNEUMONIA adults whose healthy images are called TUBERCULOSIS
shows it here, and nowhere in the scores of the present classes.

Subgroups: per group (a source collection, a hospital, a patient; :mod:`cxr.data.groups`), the image count,
the classes present and the table's scores with bootstrap intervals; groups under ``MIN_GROUP_IMAGES``
images are named as too small to score rather than scored (hidden stratification: Oakden-Rayner et al., 2020).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cxr.evaluate import metrics

SAME_SOURCE_PAIRS = (("NORMAL", "PNEUMONIA"),)
MIN_GROUP_IMAGES = 10


def pair_name(first: str, second: str) -> str:
    return f"{first} vs {second}"


def _pair_auroc(labels01: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """``(..., n)`` labels (0: a, 1: b) and ``(..., n, 2)`` probabilities of a and b -> the pair's AUROC."""
    with np.errstate(invalid="ignore"):
        return metrics.auroc(labels01, probabilities).mean(-1)


def pairwise_auroc(labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str],
                   resamples: int = metrics.BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """``{"A vs B": {"auroc", "ci95", "images", "same_source"}}`` for every pair of classes; ``auroc`` and
    ``ci95`` are None where one of the two has no image (undefined). Intervals: percentile bootstrap over
    the pair's images (resamples holding one class only are left out)."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=np.float64)
    rng = np.random.default_rng(seed)
    tails = [100 * (1 - metrics.CONFIDENCE_LEVEL) / 2, 100 * (1 + metrics.CONFIDENCE_LEVEL) / 2]
    result: dict[str, Any] = {}
    for a in range(len(classes)):
        for b in range(a + 1, len(classes)):
            chosen = np.flatnonzero((labels == a) | (labels == b))
            pair = (classes[a], classes[b])
            entry: dict[str, Any] = {"auroc": None, "ci95": None, "images": int(len(chosen)),
                                     "same_source": pair in SAME_SOURCE_PAIRS}
            labels01 = (labels[chosen] == b).astype(np.int64)
            if 0 < labels01.sum() < len(labels01):
                scores = probabilities[chosen][:, [a, b]]
                entry["auroc"] = float(_pair_auroc(labels01, scores))
                draws = rng.integers(0, len(chosen), size=(resamples, len(chosen)))
                values = _pair_auroc(labels01[draws], scores[draws])
                values = values[np.isfinite(values)]
                entry["ci95"] = [float(v) for v in np.percentile(values, tails)] if len(values) else None
            result[pair_name(*pair)] = entry
    return result


def prediction_shares(labels: np.ndarray, predictions: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Per true class present: its image count and ``{predicted class: share}`` over every class."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    shares = {}
    for k, name in enumerate(classes):
        own = predictions[labels == k]
        if len(own):
            counts = np.bincount(own, minlength=len(classes))
            shares[name] = {"images": int(len(own)),
                            "predicted": {c: float(counts[j] / len(own)) for j, c in enumerate(classes)}}
    return shares


def shares_sentence(shares: dict[str, Any], absent: Sequence[str]) -> str | None:
    """How the images of each present class were called, absent classes named as such; None when every
    class is present (the confusion matrix says it all)."""
    if not absent:
        return None
    parts = []
    for name, entry in shares.items():
        called = sorted(entry["predicted"].items(), key=lambda item: -item[1])
        listed = ", ".join(f"{share:.0%} {c}" + (" (absent here)" if c in absent else "")
                           for c, share in called if share > 0)
        parts.append(f"of the {entry['images']} {name} images, {listed}")
    sent = sum(entry["images"] * sum(entry["predicted"][c] for c in absent) for entry in shares.values())
    total = sum(entry["images"] for entry in shares.values())
    return (f"{round(sent)} of {total} images ({sent / total:.0%}) were called a class this folder does not hold "
            f"({', '.join(absent)}): " + "; ".join(parts) + ".")


def shares_short(shares: dict[str, Any], absent: Sequence[str]) -> str | None:
    """The share of images called an absent class, and each present class's largest such share, in a clause."""
    if not absent or not shares:
        return None
    total = sum(entry["images"] for entry in shares.values())
    sent = sum(entry["images"] * sum(entry["predicted"][c] for c in absent) for entry in shares.values())
    largest = []
    for name, entry in shares.items():
        target = max(absent, key=lambda c: entry["predicted"][c])
        largest.append(f"{name} {entry['predicted'][target]:.0%} {target}")
    return f"{sent / total:.0%} of its images called an absent class ({', '.join(largest)})"


def subgroup_scores(labels: np.ndarray, probabilities: np.ndarray, groups: Sequence[str], classes: Sequence[str],
                    minimum: int = MIN_GROUP_IMAGES) -> dict[str, Any]:
    """Per group: images, counts per class and (from ``minimum`` images) the table's scores with bootstrap
    intervals; smaller groups are listed under ``too_small`` and not scored."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    predictions = np.asarray(probabilities).argmax(1)
    scored, too_small = {}, {}
    for group in sorted(set(groups.tolist())):
        chosen = groups == group
        counts = {c: int((labels[chosen] == k).sum()) for k, c in enumerate(classes) if (labels[chosen] == k).any()}
        if chosen.sum() < minimum:
            too_small[group] = {"images": int(chosen.sum()), "counts": counts}
            continue
        group_probabilities = probabilities[chosen]
        scored[group] = {"images": int(chosen.sum()), "counts": counts,
                         **metrics.point_scores(labels[chosen], predictions[chosen], classes, group_probabilities),
                         "ci95": metrics.bootstrap_ci(labels[chosen], predictions[chosen], classes,
                                                      group_probabilities)}
    return {"minimum_images": minimum, "groups": scored, "too_small": too_small}


def subgroup_sentence(report: dict[str, Any], column: str) -> str:
    """The spread of accuracy across the scored groups, and the groups too small to score."""
    scored, small = report["groups"], report["too_small"]
    parts = []
    if scored:
        ordered = sorted(scored.items(), key=lambda item: item[1]["accuracy"])
        (low_name, low), (high_name, high) = ordered[0], ordered[-1]
        parts.append(f"By {column}, accuracy ranges from {low['accuracy']:.2f} ({low_name}, {low['images']} images) "
                     f"to {high['accuracy']:.2f} ({high_name}, {high['images']} images) over {len(scored)} "
                     f"group{'s' if len(scored) != 1 else ''}")
    if small:
        names = ", ".join(list(small)[:3]) + (f" and {len(small) - 3} more" if len(small) > 3 else "")
        parts.append(f"{len(small)} group{'s' if len(small) != 1 else ''} under {report['minimum_images']} images "
                     f"{'are' if len(small) != 1 else 'is'} too small to score ({names})")
    return "; ".join(parts) + "."


def same_source_sentence(pairs: dict[str, Any] | None) -> str | None:
    """What the same-source pair scores: the one AUROC the source cannot explain (None without pair scores)."""
    if not pairs:
        return None
    texts = []
    for first, second in SAME_SOURCE_PAIRS:
        entry = pairs.get(pair_name(first, second))
        if entry is None:
            continue
        if entry["auroc"] is None:
            if entry["images"]:
                texts.append(f"{first} vs {second} AUROC is undefined here (only one of the two is present).")
            continue
        low, high = entry["ci95"] or (entry["auroc"], entry["auroc"])
        texts.append(f"{first} vs {second}, the pair that shares a source in this dataset (the Kermany children), "
                     f"reaches AUROC {entry['auroc']:.2f} (95% interval {low:.2f}-{high:.2f}) on {entry['images']} "
                     "images: the one score here that the source cannot explain.")
    defined = [entry for entry in pairs.values() if entry["auroc"] is not None]
    if not defined and not texts:
        texts.append("Pairwise AUROC is undefined: the images hold one class only.")
    return " ".join(texts) or None


def check_sentences(test: dict[str, Any]) -> list[str]:
    """The sentences of the breakdowns a test section holds (none for files from before they existed)."""
    sentences = [same_source_sentence(test.get("pairwise_auroc")),
                 (test.get("class_shares") or {}).get("sentence"),
                 (test.get("groups") or {}).get("sentence")]
    return [s for s in sentences if s]
