"""Is it the lungs? Every test evaluation scores the checkpoint three ways and looks where it looks.

Views: the test images as they are, with the lung field hidden, and with everything but the lung field
hidden (the lung field of :mod:`cxr.data.lung_field`, carried through the evaluation resize and crop like
the pixels). Hidden pixels become 0 after normalisation, i.e. the normalisation mean of each channel:
the first layer's zero input, where its weights contribute nothing. With ImageNet's statistics
(0.485, 0.456, 0.406) it is not exactly grey, but within 0.2 standard deviations in every channel of
the mid grey 0.45 (115 of 255) that every training X-ray holds. Black would not do: black borders and
letterboxes are themselves a source cue in this dataset.

Saliency: Grad-CAM (:mod:`cxr.evaluate.cam`) of the predicted class for up to ``CAM_IMAGES`` test images
(spread over the classes; the cap keeps a CPU evaluation cheap), and the share of each map's mass that
falls inside the lung field, per true class, beside the share of the input the lung field covers (what
a uniform map would give). Sanity check (Adebayo et al., 2018): the same maps from a copy of the model
whose trained layers are re-initialised (seeded), and their Spearman rank correlation with the trained
maps; maps that barely change say little about what was learned.

These are the building blocks; :mod:`cxr.audit.checks` runs them (with the equal-area controls and the
train-on-view probes of :mod:`cxr.evaluate.lung_evidence`, whose verdicts replace the masked scores' old reading)
into metrics.json under ``shortcuts``, with ``shortcuts.png``.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from cxr.evaluate.figures import save_figure
from cxr.data.cache import cache_split
from cxr.data.dataset import Split
from cxr.data.imageio import decode_image
from cxr.data.preprocessing import Preprocessing
from cxr.common.runtime import Runtime

VIEWS = {"as_is": "as is", "lungs_hidden": "lung field hidden", "lungs_only": "only the lung field"}
CAM_IMAGES = 32
CAM_BATCH = 8
FIGURE = "shortcuts.png"
# Maps whose lung share sits this close to the lung field's area, trained and re-initialised alike, carry no
# location: at 64 px ResNet's last stage is 2x2, and any upsampled 2x2 map gives a symmetric field its area.
COARSE = 0.005


def decoded_squares(split: Split, side: int, runtime: Runtime) -> np.ndarray:
    """The test split's decoded squares, from the image cache when the run uses it."""
    if runtime.cache:
        return cache_split(split, side, runtime.cache_dir, progress=runtime.progress, description="decode test").images
    return np.stack([decode_image(path, side) for path in split.paths])


def input_masks(lung: np.ndarray, preprocessing: dict[str, Any]) -> torch.Tensor:
    """``(N, S, S)`` lung fields on the decoded squares -> ``(N, 1, H, W)`` booleans on the model inputs:
    the evaluation's resize and centre crop, applied to the mask as to the pixels."""
    resize, size = preprocessing["resize"], preprocessing["image_size"]
    masks = torch.from_numpy(np.ascontiguousarray(lung, dtype=np.float32))[:, None]
    if masks.shape[-1] != resize:
        masks = F.interpolate(masks, size=(resize, resize), mode="bilinear", align_corners=False)
    top = int(round((resize - size) / 2.0))
    return masks[..., top:top + size, top:top + size] >= 0.5


def view_inputs(squares: np.ndarray, lung: torch.Tensor, view: str, preprocessing: dict[str, Any]) -> torch.Tensor:
    """Normalised model inputs of ``squares`` in one view; hidden pixels are 0 (the normalisation mean)."""
    transform = Preprocessing.from_dict(preprocessing).transform()
    inputs = transform(torch.from_numpy(np.ascontiguousarray(squares))[:, None])
    if view == "lungs_hidden":
        return inputs.masked_fill(lung, 0.0)
    if view == "lungs_only":
        return inputs.masked_fill(~lung, 0.0)
    return inputs


def choose_cam_images(labels: np.ndarray, count: int = CAM_IMAGES, seed: int = 0) -> np.ndarray:
    """Up to ``count`` indices, taken from the classes in turn (seeded), so every class is represented."""
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(np.flatnonzero(labels == k))) for k in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < min(count, len(labels)):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(int(queue.pop()))
    return np.asarray(sorted(chosen), dtype=np.int64)


def randomised_copy(model: nn.Module, seed: int = 0) -> tuple[nn.Module, int]:
    """A copy whose trained layers (modules whose own parameters all require grad) are re-initialised
    with their default initialisation, seeded; and how many parameters that re-initialised."""
    clone = copy.deepcopy(model)
    reset = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in clone.modules():
            own = list(module.parameters(recurse=False))
            if own and all(p.requires_grad for p in own) and hasattr(module, "reset_parameters"):
                module.reset_parameters()
                reset += sum(p.numel() for p in own)
    return clone.eval(), reset


def _cam_maps(model: nn.Module, inputs: torch.Tensor, targets: np.ndarray) -> np.ndarray:
    from cxr.evaluate.cam import grad_cam

    return np.concatenate([grad_cam(model, inputs[start:start + CAM_BATCH], targets[start:start + CAM_BATCH])
                           for start in range(0, len(inputs), CAM_BATCH)])


def lung_share(maps: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Per map, the share of its mass inside the lung field (NaN for an all-zero map)."""
    total = maps.reshape(len(maps), -1).sum(1)
    inside = (maps * lung).reshape(len(maps), -1).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def saliency_report(model: nn.Module, squares: np.ndarray, lung: np.ndarray, labels: np.ndarray,
                    predictions: np.ndarray, preprocessing: dict[str, Any], classes: Sequence[str],
                    count: int = CAM_IMAGES) -> dict[str, Any] | None:
    """Grad-CAM mass inside the lung field (per true class) and the model-randomisation check."""
    chosen = choose_cam_images(labels, count)
    if not len(chosen):
        return None
    masks = input_masks(lung[chosen], preprocessing)
    inputs = view_inputs(squares[chosen], masks, "as_is", preprocessing)
    targets = predictions[chosen]
    trained = _cam_maps(model, inputs, targets)
    random_model, reset = randomised_copy(model)
    randomised = _cam_maps(random_model, inputs, targets)
    inside = masks[:, 0].numpy()
    shares, random_shares = lung_share(trained, inside), lung_share(randomised, inside)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant map has no ranks: its correlation is NaN and left out
        rho = np.array([spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(trained, randomised)], dtype=float)
    chosen_labels = labels[chosen]
    return {
        "images": len(chosen),
        "cap": count,
        "target": "predicted class",
        "lung_area_share": float(inside.mean()),
        "lung_share": _mean(shares),
        "lung_share_per_class": {c: _mean(shares[chosen_labels == k]) for k, c in enumerate(classes)
                                 if (chosen_labels == k).any()},
        "randomisation": {
            "reinitialised_parameters": reset,
            "lung_share": _mean(random_shares),
            "spearman_mean": _mean(rho),
            "spearman_median": None if np.isnan(rho).all() else float(np.nanmedian(rho)),
            "images_with_constant_map": int(np.isnan(rho).sum()),
        },
    }


def saliency_sentence(saliency: dict[str, Any] | None) -> str | None:
    """One plain sentence on where the maps fall and whether they pass the randomisation check."""
    if not saliency or saliency.get("lung_share") is None:
        return None
    share, area = saliency["lung_share"], saliency["lung_area_share"]
    random_share = saliency["randomisation"]["lung_share"]
    if abs(share - area) < COARSE and random_share is not None and abs(random_share - area) < COARSE:
        return (f"Grad-CAM cannot tell here: its maps are too coarse at this input size (each puts the lung field's "
                f"own area share, {area:.0%}, inside it, for the trained and the re-initialised model alike).")
    where = "more than" if share > area + 0.05 else "less than" if share < area - 0.05 else "about as much as"
    text = (f"Grad-CAM puts {share:.0%} of its mass inside the lung field, which covers {area:.0%} of the input: "
            f"{where} a uniform map would ({saliency['images']} test images)")
    rho = saliency["randomisation"]["spearman_mean"]
    if rho is None:
        return text + "."
    if rho >= 0.5:
        check = (f"the maps of the model with its trained layers re-initialised are much the same (Spearman {rho:.2f}), "
                 "so they show the architecture more than what was learned")
    else:
        check = (f"re-initialising the trained layers changes them (Spearman {rho:.2f}), so they depend on what "
                 "was learned")
    return f"{text}; {check}."


BARS = (("as_is", "as is"), ("lungs_hidden", "lung field\nhidden"), ("control_hidden", "equal area\noutside hidden"),
        ("lungs_only", "only the\nlung field"), ("control_only", "only an equal\narea outside"))


def _bar_values(checks: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Test-time macro-F1 of the model per bar (controls: mean over placements) and the probes' (NaN: none)."""
    views, controls = checks["views"], (checks.get("controls") or {}).get("views", {})
    model = []
    for key, _ in BARS:
        if key.startswith("control_"):
            mode = key.split("_")[1]
            model.append(float(np.mean([v["macro_f1"] for name, v in controls.items() if name.endswith(mode)])))
        else:
            model.append(views[key]["macro_f1"])
    probes = checks.get("probes") or {}
    return model, [probes[key]["macro_f1"] if key in probes else np.nan for key, _ in BARS]


def plot_shortcuts(square: np.ndarray, lung: np.ndarray, checks: dict[str, Any], preprocessing: dict[str, Any],
                   path: Path | None = None, title: str = "") -> plt.Figure:
    """One test image in each view (and one equal-area control), and macro-F1 per view: the model on masked
    test images, and the linear probe fit and tested on that view."""
    from cxr.evaluate.cam import as_display
    from cxr.evaluate.lung_evidence import control_region

    figure, axes = plt.subplots(1, 5, figsize=(19.5, 3.9), layout="constrained",
                                gridspec_kw={"width_ratios": [1, 1, 1, 1, 2.2]})
    masks = input_masks(lung[None], preprocessing)
    shown = [(view_inputs(square[None], masks, view, preprocessing), name) for view, name in VIEWS.items()]
    shown.append((view_inputs(square[None], control_region(masks, "top"), "lungs_hidden", preprocessing),
                  "control: equal area hidden (top)"))
    for axis, (inputs, name) in zip(axes, shown):
        axis.imshow(as_display(inputs[0], preprocessing))
        axis.set_title(name, fontsize=9)
        axis.axis("off")
    model, probes = _bar_values(checks)
    positions, width = np.arange(len(BARS)), 0.38
    bars = axes[4].bar(positions - width / 2, model, width, label="model, masked at test time", color="#4c72b0")
    axes[4].bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    if not np.isnan(probes).all():
        bars = axes[4].bar(positions + width / 2, probes, width, label="linear probe fit on that view", color="#55a868")
        axes[4].bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    axes[4].axhline(checks["chance_macro_f1"], color="grey", linestyle="--", linewidth=1, label="chance")
    axes[4].set_xticks(positions, [name for _, name in BARS], fontsize=8)
    axes[4].set(ylabel="test macro-F1", ylim=(0, 1.1), title="macro-F1 per view")
    axes[4].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the bars
    figure.suptitle(title)
    if path is not None:
        save_figure(figure, path, dpi=110)
    return figure
