"""Does the model use the lungs, or the source? Masks with an equal-area control, train-on-view probes, verdicts.

Hiding the lung field at test time confuses two things: a model that needs the lungs, and a model merely
surprised by a large grey shape it never saw in training. Two measurements separate them.

Equal-area control. Besides the lung field, a control region of the same area *outside* it is hidden (and
shown alone). Geometry: in each model input, as many pixels outside the lung field as the lung field holds,
taken nearest to one edge; three placements, whose scores are averaged: ``top`` (neck, shoulders, upper
corners), ``bottom`` (diaphragm, abdomen, lower corners) and ``sides`` (left and right edges together: arms,
lateral chest wall). The lungs' effect is (drop with the lung field hidden) - (drop with the control hidden),
with a paired bootstrap interval (the same resampled images for every view). A drop is attributed to the
lungs only when that interval lies above 0.

Train-on-view probes. For each view (as is, lung field hidden, only the lung field) a linear probe is fit
on the model's pooled features (``model.backbone``) of the training split shown in that view, and scored on
the test split in the same view: how much class information each region carries in this model's features,
free of the test-time shift (Maguolo and Nanni, 2021, train on masked images for this reason). Probe:
``StandardScaler`` then scikit-learn ``LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)``
(lbfgs, deterministic), on at most ``PROBE_TRAIN_PER_CLASS`` training images per class (seeded draw).

Verdicts (:func:`verdicts`): each sentence is one case of ``CASES``, chosen by the numbers and their
intervals; the table is documented in docs/robustness.md.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from cxr.evaluate import metrics
from cxr.evaluate import uncertainty
from cxr.data.preprocessing import Preprocessing
from cxr.common.runtime import Runtime
from cxr.evaluate.shortcuts import input_masks

PLACEMENTS = ("top", "bottom", "sides")
PROBE_VIEWS = ("as_is", "lungs_hidden", "lungs_only")
PROBE_TRAIN_PER_CLASS = 500
PROBE_SETTINGS = ("StandardScaler + LogisticRegression(C=1.0, class_weight='balanced', max_iter=2000, "
                  "solver='lbfgs') on the pooled features (model.backbone)")
CONTROL_GEOMETRY = ("as many pixels outside the lung field as it holds, nearest the top edge, the bottom edge, or the "
                    "left and right edges (three placements, averaged)")
NEAR_CHANCE = 0.05
CASES = {
    "at_chance": "the model is at chance as is: no mask can say what it uses",
    "lungs_needed": "hiding the lungs costs more than hiding an equal area outside them (interval above 0)",
    "outside_needed_more": "hiding an equal area outside the lungs costs more than hiding the lungs (interval below 0)",
    "drop_not_lungs": "hiding the lungs costs no more than hiding an equal area outside them (interval holds 0)",
    "lungs_alone_more": "shown alone, the lung field keeps more than an equal area outside it (interval above 0)",
    "lungs_alone_less": "shown alone, the lung field keeps less than an equal area outside it (interval below 0)",
    "lungs_alone_same": "shown alone, the lung field keeps as much as an equal area outside it (interval holds 0)",
    "outside_readable": "a probe fit outside the lung field reads the class (interval above chance + 0.05)",
    "outside_not_readable": "a probe fit outside the lung field does not clearly read the class",
    "lungs_readable": "a probe fit on the lung field alone reads the class (interval above chance + 0.05)",
    "lungs_not_readable": "a probe fit on the lung field alone does not clearly read the class",
}


def control_region(lung: torch.Tensor, placement: str) -> torch.Tensor:
    """``(N, 1, H, W)`` lung fields on the model inputs -> control regions of the same shape: per image, as
    many pixels outside the lung field as it holds, nearest the placement's edge(s) (row-major on ties)."""
    n, _, height, width = lung.shape
    rows = torch.arange(height)[:, None].expand(height, width)
    columns = torch.arange(width)[None, :].expand(height, width)
    distance = {"top": rows, "bottom": height - 1 - rows,
                "sides": torch.minimum(columns, width - 1 - columns)}[placement]
    key = (distance * height * width + torch.arange(height * width).view(height, width)).flatten()
    region = torch.zeros_like(lung)
    for index in range(n):
        inside = lung[index, 0].flatten()
        order = key.masked_fill(inside, height * height * width * width).argsort()[:int(inside.sum())]
        flat = region[index, 0].view(-1)
        flat[order] = True
        flat &= ~inside
    return region


def region_of(view: str) -> tuple[str | None, Callable[[torch.Tensor], torch.Tensor]]:
    """``"lungs_hidden"``, ``"top_only"``, ... -> ("hidden" | "only" | None, lung mask -> region mask)."""
    if view == "as_is":
        return None, lambda lung: lung
    region, mode = view.rsplit("_", 1)
    return mode, (lambda lung: lung) if region == "lungs" else (lambda lung: control_region(lung, region))


@torch.inference_mode()
def view_outputs(model: nn.Module, squares: np.ndarray, lung: np.ndarray, view: str, preprocessing: dict[str, Any],
                 runtime: Runtime, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (``model.backbone``) and logits (``model.head``) of every square in one view; hidden
    pixels are 0 after normalisation, as in :mod:`cxr.evaluate.shortcuts`."""
    model.eval()
    mode, region = region_of(view)
    features, logits, transform = [], [], Preprocessing.from_dict(preprocessing).transform()
    for start in range(0, len(squares), batch_size):
        lung_in = input_masks(lung[start:start + batch_size], preprocessing)
        inputs = transform(torch.from_numpy(np.ascontiguousarray(
            squares[start:start + batch_size]))[:, None])
        if mode is not None:
            mask = region(lung_in)
            inputs = inputs.masked_fill(mask if mode == "hidden" else ~mask, 0.0)
        with runtime.autocast():
            pooled = model.backbone(runtime.to_device(inputs)).float()
            logits.append(model.head(pooled).float().cpu())
        features.append(pooled.cpu())
    return torch.cat(features).numpy(), torch.cat(logits).numpy()


def probe_training_images(labels: Sequence[int], per_class: int = PROBE_TRAIN_PER_CLASS, seed: int = 0) -> np.ndarray:
    """Indices of at most ``per_class`` training images of each class (seeded draw), sorted."""
    labels, rng = np.asarray(labels), np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == k))[:per_class] for k in np.unique(labels)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int) -> np.ndarray:
    """Fit the documented probe on ``train_x`` and return log-probabilities of ``test_x`` over every class
    (a class absent from training gets probability 0), usable as logits."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000))
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(train_x, train_y)
        probabilities = np.zeros((len(test_x), num_classes))
        probabilities[:, probe.classes_] = probe.predict_proba(test_x)
    return np.log(np.clip(probabilities, 1e-12, None))


def probe_scores(train_features: dict[str, np.ndarray], train_labels: np.ndarray,
                 test_features: dict[str, np.ndarray], test_labels: np.ndarray, classes: Sequence[str],
                 ) -> dict[str, Any] | None:
    """Per view: the probe fit on the training features of that view, scored on the test features of the
    same view (the table's scores, bootstrap intervals, ECE). None with fewer than two training classes."""
    if len(np.unique(train_labels)) < 2:
        return None
    scores: dict[str, Any] = {"settings": PROBE_SETTINGS, "train_images": int(len(train_labels))}
    for view in PROBE_VIEWS:
        logits = fit_probe(train_features[view], train_labels, test_features[view], len(classes))
        scores[view] = uncertainty.summary_with_ci(logits, test_labels, classes)
    return scores


def paired_difference(labels: np.ndarray, first: Sequence[np.ndarray], second: Sequence[np.ndarray], k: int,
                      resamples: int = metrics.BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """mean macro-F1 of the ``first`` predictions minus mean macro-F1 of the ``second`` (each a list of
    prediction arrays, averaged), with a paired percentile bootstrap interval: every resample draws the
    same images for every set of predictions."""
    labels = np.asarray(labels)
    draws = np.random.default_rng(seed).integers(0, len(labels), size=(resamples, len(labels)))

    def resampled(predictions: Sequence[np.ndarray]) -> np.ndarray:
        values = []
        for prediction in predictions:
            cells = labels[draws] * k + prediction[draws] + (np.arange(resamples) * k * k)[:, None]
            values.append(metrics.macro_f1(np.bincount(cells.ravel(), minlength=resamples * k * k)
                                           .reshape(resamples, k, k)))
        return np.mean(values, axis=0)

    def point(predictions: Sequence[np.ndarray]) -> float:
        return float(np.mean([metrics.macro_f1(metrics.confusion(labels, p, k)) for p in predictions]))

    tails = [100 * (1 - metrics.CONFIDENCE_LEVEL) / 2, 100 * (1 + metrics.CONFIDENCE_LEVEL) / 2]
    difference = resampled(first) - resampled(second)
    return {"first": point(first), "second": point(second), "difference": point(first) - point(second),
            "ci95": [float(v) for v in np.percentile(difference, tails)]}


def controlled_drops(labels: np.ndarray, predictions: dict[str, np.ndarray], k: int) -> dict[str, Any]:
    """The lungs' effect against the equal-area control, hidden and shown alone, with paired intervals."""
    hidden = paired_difference(labels, [predictions[f"{p}_hidden"] for p in PLACEMENTS],
                               [predictions["lungs_hidden"]], k)
    only = paired_difference(labels, [predictions["lungs_only"]], [predictions[f"{p}_only"] for p in PLACEMENTS], k)
    plain = float(metrics.macro_f1(metrics.confusion(labels, predictions["as_is"], k)))
    return {
        "hidden": {"lungs_drop": plain - hidden["second"], "control_drop": plain - hidden["first"],
                   "difference": hidden["difference"], "ci95": hidden["ci95"],
                   "attributed_to_lungs": hidden["ci95"][0] > 0},
        "only": {"lungs": only["first"], "control": only["second"], "difference": only["difference"],
                 "ci95": only["ci95"]},
    }


def _side(interval: Sequence[float]) -> int:
    return 1 if interval[0] > 0 else -1 if interval[1] < 0 else 0


def masked_verdicts(plain: float, controls: dict[str, Any], chance: float) -> list[tuple[str, str]]:
    """(case, sentence) for the test-time masks read against the equal-area control."""
    if plain <= chance + NEAR_CHANCE:
        return [("at_chance", f"Macro-F1 is {plain:.2f} as is, no better than chance ({chance:.2f}): hiding parts of "
                              "the image cannot say what the model uses.")]
    hidden, only = controls["hidden"], controls["only"]
    low, high = hidden["ci95"]
    numbers = (f"hiding the lung field costs {hidden['lungs_drop']:.2f} macro-F1, hiding an equal area outside it "
               f"{hidden['control_drop']:.2f} (difference {hidden['difference']:+.2f}, 95% interval {low:+.2f} to "
               f"{high:+.2f})")
    case = {1: ("lungs_needed", ": the model's decisions depend on the lungs."),
            -1: ("outside_needed_more", ": what lies outside the lungs matters more to it."),
            0: ("drop_not_lungs", ": the drop says nothing about the lungs, any large grey shape does as much.")}
    name, ending = case[_side(hidden["ci95"])]
    sentences = [(name, numbers[0].upper() + numbers[1:] + ending)]
    low, high = only["ci95"]
    shown = (f"Shown only the lung field it scores {only['lungs']:.2f}, shown only an equal area outside it "
             f"{only['control']:.2f} (difference {only['difference']:+.2f}, 95% interval {low:+.2f} to {high:+.2f})")
    case = {1: ("lungs_alone_more", ": the lung field alone keeps more of what it uses."),
            -1: ("lungs_alone_less", ": the lung field alone keeps less of what it uses than other regions."),
            0: ("lungs_alone_same", ": no region keeps more of what it uses than another.")}
    name, ending = case[_side(only["ci95"])]
    return sentences + [(name, shown + ending)]


def probe_verdicts(probes: dict[str, Any] | None, chance: float) -> list[tuple[str, str]]:
    """(case, sentence) for the train-on-view probes: can the class be read outside, and inside, the lungs?"""
    if not probes:
        return []
    whole = probes["as_is"]["macro_f1"]
    sentences = []
    for view, where, readable, not_readable in (
            ("lungs_hidden", "Outside the lung field alone", ": the class, and with it the source, can be read "
             "without the lungs.", ": the class cannot clearly be read without the lungs."),
            ("lungs_only", "Inside the lung field alone", ": the lung field carries class information in these "
             "features.", ": the lung field alone carries little class information in these features.")):
        score, (low, high) = probes[view]["macro_f1"], probes[view]["ci95"]["macro_f1"]
        text = (f"{where}, a linear probe on the model's features reaches macro-F1 {score:.2f} (95% interval "
                f"{low:.2f}-{high:.2f}) against {whole:.2f} on whole images")
        read = low > chance + NEAR_CHANCE
        prefix = "outside" if view == "lungs_hidden" else "lungs"
        sentences.append((f"{prefix}_{'readable' if read else 'not_readable'}",
                          text + (readable if read else not_readable)))
    return sentences


def _interval(entry: dict[str, Any]) -> str:
    return f"{entry['difference']:+.2f}, 95% interval {entry['ci95'][0]:+.2f} to {entry['ci95'][1]:+.2f}"


def short_verdict(cases: Sequence[str], controls: dict[str, Any], probes: dict[str, Any] | None) -> str:
    """The same cases in one compact line, for README's table of runs."""
    hidden, only = controls["hidden"], controls["only"]
    phrases = {
        "at_chance": "at chance as is: the masks cannot tell",
        "lungs_needed": f"hiding the lungs costs more than an equal area outside them ({_interval(hidden)}): it "
                        "depends on the lungs",
        "outside_needed_more": f"hiding an equal area outside the lungs costs more than hiding them "
                               f"({_interval(hidden)})",
        "drop_not_lungs": f"hiding the lungs costs no more than an equal area outside them ({_interval(hidden)})",
        "lungs_alone_more": f"the lungs alone keep more than an equal area ({_interval(only)})",
        "lungs_alone_less": f"the lungs alone keep less than an equal area ({_interval(only)})",
        "lungs_alone_same": f"the lungs alone keep as much as an equal area ({_interval(only)})",
    }
    if probes:
        outside, inside = probes["lungs_hidden"]["macro_f1"], probes["lungs_only"]["macro_f1"]
        phrases.update({"outside_readable": f"a probe reads the class outside the lungs ({outside:.2f})",
                        "outside_not_readable": f"a probe cannot clearly read it outside the lungs ({outside:.2f})",
                        "lungs_readable": f"a probe reads it on the lungs alone ({inside:.2f})",
                        "lungs_not_readable": f"a probe cannot clearly read it on the lungs alone ({inside:.2f})"})
    text = "; ".join(phrases[case] for case in cases)
    return text[0].upper() + text[1:] + "."


def verdicts(plain: float, controls: dict[str, Any], probes: dict[str, Any] | None,
             chance: float) -> dict[str, Any]:
    """The cases that hold and their sentences, joined (the model card, the CLI), and in one compact line
    (README)."""
    chosen = masked_verdicts(plain, controls, chance) + probe_verdicts(probes, chance)
    cases = [name for name, _ in chosen]
    return {"cases": cases, "sentence": " ".join(text for _, text in chosen),
            "short": short_verdict(cases, controls, probes)}
