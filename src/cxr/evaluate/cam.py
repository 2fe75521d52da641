"""Where the model looked: Grad-CAM heat maps (the maintained ``grad-cam`` package) and their overlays.

The layer each architecture's Grad-CAM reads is in its registry entry (:mod:`cxr.models.backbones`). ResNets: the
last convolutional stage (``layer4``, 7x7 at 224 px). MobileNetV2: its last 1x1 convolution (7x7). ViT-B/16:
the input of the last encoder block's attention (``ln_1``), with the class token dropped and the patch tokens
reshaped to their 14x14 grid. The *output* of the last block cannot be used: only the class token reaches
the head from there, so every patch token's gradient is zero.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from cxr.evaluate.figures import save_figure
from cxr.models.backbones import BACKBONES
from cxr.data.imageio import decode_image
from cxr.data.preprocessing import Preprocessing


def vit_tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1 + h*w, D) ViT tokens -> (B, D, h, w) feature map, class token dropped."""
    patches = tokens[:, 1:, :]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid")
    return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)


def target_layer(model: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The layer Grad-CAM reads for this classifier, and how to turn its output into a (B, C, h, w) map."""
    arch = getattr(model, "arch", "")
    if arch not in BACKBONES:
        raise ValueError(f"no Grad-CAM target layer known for architecture {arch!r}")
    spec = BACKBONES[arch]
    return spec.cam_layer(model.backbone), vit_tokens_to_grid if spec.cam_tokens else None


def grad_cam(model: nn.Module, images: torch.Tensor, targets: Sequence[int] | None = None) -> np.ndarray:
    """Heat maps of shape (B, H, W) with values in [0, 1], for the class in ``targets`` (default: the
    predicted class). The model runs in eval mode, where gradients flow through a frozen backbone;
    the input is made to require grad so that they reach the target layer even when every backbone
    parameter is frozen. The model's mode is restored and no gradient is left behind."""
    layer, reshape = target_layer(model)
    was_training = model.training
    device = next(model.parameters()).device
    chosen = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
    inputs = images.detach().to(device).requires_grad_(True)
    explainer = GradCAM(model=model, target_layers=[layer], reshape_transform=reshape)
    # eager, whatever part of the model is compiled: a compiled graph may not run hooks added after it was
    # traced (Grad-CAM's are), and its backward cannot be run twice as Grad-CAM does
    with torch.enable_grad(), torch.compiler.set_stance("force_eager"), explainer:
        maps = explainer(input_tensor=inputs, targets=chosen)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return np.clip(maps, 0.0, 1.0)


def as_display(inputs: torch.Tensor, preprocessing: dict[str, Any]) -> np.ndarray:
    """One normalised model input ``(3, H, W)`` as an ``(H, W, 3)`` float image in [0, 1]: the pixels the model saw."""
    recipe = Preprocessing.from_dict(preprocessing)
    mean = torch.tensor(recipe.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(recipe.std, dtype=torch.float32).view(-1, 1, 1)
    return (inputs.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def overlay(display: np.ndarray, heat_map: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the heat map (jet colours) blended half and half with the image."""
    return show_cam_on_image(display.astype(np.float32), heat_map, use_rgb=True, image_weight=0.5)


PANEL_MIN = 256  # each half of an overlay PNG is at least this many pixels wide: a 64 px input stays readable
CAPTION_HEIGHT = 28  # the caption strip above the pictures
BAR_WIDTH = 56  # the colour bar (16 px) and its labels, right of the overlay
FONT_SIZE = 16


def overlay_size(side: int) -> tuple[int, int]:
    """(width, height) of the PNG :func:`save_overlay` writes for a ``side`` x ``side`` model input."""
    panel = max(side, PANEL_MIN)
    return 2 * panel + BAR_WIDTH, panel + CAPTION_HEIGHT


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's own scalable font (needs FreeType)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def colour_bar(height: int) -> np.ndarray:
    """(height, 16, 3) uint8: the overlay's colours from the heat map's 1 (top) to 0 (bottom)."""
    ramp = np.linspace(1, 0, height, dtype=np.float32)[:, None].repeat(16, axis=1)
    return show_cam_on_image(np.zeros((height, 16, 3), np.float32), ramp, use_rgb=True, image_weight=0.0)


def save_overlay(display: np.ndarray, heat_map: np.ndarray, path: Path, caption: str | None = None,
                 text: dict[str, str] | None = None) -> Path:
    """Write the image and its overlay side by side as one PNG, each at least :data:`PANEL_MIN` px, with a colour
    bar (the heat map's 0 to 1, relative to this image's maximum) and ``caption`` (the predicted class and its
    probability, say) above them, so an overlay still says what it shows once it is copied away; ``text`` goes into
    the PNG's text chunks (``cxr predict`` marks its overlays there, to know them later)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pair = [Image.fromarray((display * 255).round().astype(np.uint8)), Image.fromarray(overlay(display, heat_map))]
    width, height = overlay_size(display.shape[0])
    panel = height - CAPTION_HEIGHT
    picture = Image.new("RGB", (width, height), "black")
    for number, half in enumerate(pair):
        picture.paste(half.resize((panel, panel), Image.Resampling.BICUBIC), (number * panel, CAPTION_HEIGHT))
    picture.paste(Image.fromarray(colour_bar(panel)), (2 * panel + 4, CAPTION_HEIGHT))
    draw, font = ImageDraw.Draw(picture), _font()
    for label, y in (("1", CAPTION_HEIGHT), ("0", height - FONT_SIZE - 2)):
        draw.text((2 * panel + 24, y), label, fill="white", font=font)
    draw.text((4, 4), f"{caption + ';  ' if caption else ''}left: model input, right: Grad-CAM", fill="white",
              font=font)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    picture.save(path, format="PNG", pnginfo=info)
    return path


def choose_examples(labels: np.ndarray, predictions: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Up to ``count`` indices, half of them mistakes when there are any (they teach the most)."""
    rng = np.random.default_rng(seed)
    wrong, right = np.flatnonzero(predictions != labels), np.flatnonzero(predictions == labels)
    n_wrong = min(len(wrong), count // 2)
    chosen = np.concatenate([rng.permutation(wrong)[:n_wrong], rng.permutation(right)[: count - n_wrong]])
    return rng.permutation(chosen)[:count]


def plot_cam_grid(
    model: nn.Module, paths: Sequence[Path], labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str],
    preprocessing: dict[str, Any], path: Path | None = None, count: int = 8, columns: int = 4, seed: int = 0,
    title: str = "",
) -> plt.Figure:
    """Test images (predicted and true class; mistakes in red) with the Grad-CAM of the predicted class beneath."""
    predictions = probabilities.argmax(1)
    chosen = choose_examples(np.asarray(labels), predictions, count, seed)
    recipe = Preprocessing.from_dict(preprocessing)
    squares = [decode_image(paths[i], recipe.square_side) for i in chosen]
    batch = recipe.transform()(torch.from_numpy(np.stack(squares))[:, None]) if squares else []
    displays = [as_display(inputs, preprocessing) for inputs in batch]
    heat_maps = grad_cam(model, batch, predictions[chosen]) if squares else []
    rows = 2 * max(1, math.ceil(len(chosen) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False, layout="constrained")
    for axis in axes.flat:
        axis.axis("off")
    for slot, (index, display, heat_map) in enumerate(zip(chosen, displays, heat_maps)):
        image_axis = axes[2 * (slot // columns), slot % columns]
        cam_axis = axes[2 * (slot // columns) + 1, slot % columns]
        ok = predictions[index] == labels[index]
        image_axis.imshow(display)
        image_axis.set_title(f"pred {classes[predictions[index]]} ({probabilities[index, predictions[index]]:.2f})\n"
                             f"true {classes[labels[index]]}" + ("" if ok else "  ✗"),
                             color="black" if ok else "crimson", fontsize=9)
        cam_axis.imshow(overlay(display, heat_map))
        cam_axis.set_title("Grad-CAM, predicted class", fontsize=8)
    figure.suptitle(title)
    if path is not None:
        save_figure(figure, path, dpi=110)
    return figure
