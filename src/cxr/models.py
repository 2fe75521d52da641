"""Build the three classifiers from torchvision backbones.

A model is a :class:`Classifier`: a torchvision backbone whose own head is replaced by
``nn.Identity`` (so it returns pooled features or the ViT class token) and a new linear head.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from .data import CLASSES, IMAGENET_MEAN, IMAGENET_STD
from .guards import require

ARCHITECTURES: dict[str, tuple[Any, Any, str, int]] = {
    "resnet152": (tvm.resnet152, tvm.ResNet152_Weights.DEFAULT, "fc", 2048),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.DEFAULT, "fc", 2048),
    "vit_b_16": (tvm.vit_b_16, tvm.ViT_B_16_Weights.DEFAULT, "heads", 768),
}


# Input sizes a run may ask for. Below 32 px a ResNet's 32x downsampling leaves a single feature pixel and
# training stays at chance (--image-size 1 did, without a word); above 1024 px the decoded-image cache of a
# Kaggle-sized set (7,000 squares of 1170 px) needs 9.6 GB and 100,000 px asked numpy for 438 GiB.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024
VIT_PATCH = 16


class WeightsError(RuntimeError):
    """Pretrained weights cannot be obtained or do not fit; the message says what to do."""


def check_image_size(arch: str, image_size: int) -> None:
    """Refuse an input size the architecture cannot use or a run cannot hold, before any data is read."""
    require(MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE,
            f"--image-size {image_size} is outside {MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE} px: below {MIN_IMAGE_SIZE} "
            f"a {arch} sees a single feature pixel and learns nothing, above {MAX_IMAGE_SIZE} the decoded images "
            "do not fit in memory.")
    require(not arch.startswith("vit") or image_size % VIT_PATCH == 0,
            f"--image-size {image_size} does not suit {arch}: ViT-B/16 cuts the image into {VIT_PATCH} px patches, "
            f"so the size must be a multiple of {VIT_PATCH} (e.g. {max(2, round(image_size / VIT_PATCH)) * VIT_PATCH}).")


class Classifier(nn.Module):
    """Backbone + new head. A frozen backbone stays in eval mode (BatchNorm statistics and dropout
    fixed) and runs without autograd during training; only the head learns."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, arch: str, freeze_backbone: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.arch = arch
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.freeze_backbone and self.training:
            with torch.no_grad():
                features = self.backbone(images)
            return self.head(features)
        return self.head(self.backbone(images))


def default_weights(arch: str):
    """torchvision's weight enum for an architecture (it names the download URL and preprocessing)."""
    return ARCHITECTURES[arch][1]


def preprocessing(arch: str, image_size: int) -> dict[str, Any]:
    """Normalisation and resize taken from the pretrained weights' own transforms, scaled to ``image_size``."""
    transforms = default_weights(arch).transforms()
    resize = round(image_size * transforms.resize_size[0] / transforms.crop_size[0])
    mean = tuple(transforms.mean) if transforms.mean else IMAGENET_MEAN
    std = tuple(transforms.std) if transforms.std else IMAGENET_STD
    return {"image_size": image_size, "resize": resize, "mean": list(mean), "std": list(std)}


def _backbone(arch: str, pretrained: bool, image_size: int) -> nn.Module:
    builder, weights, _, _ = ARCHITECTURES[arch]
    kwargs: dict[str, Any] = {}
    if arch.startswith("vit"):
        if pretrained and image_size != 224:
            raise WeightsError(f"ViT-B/16 ImageNet weights need --image-size 224, not {image_size}.")
        kwargs["image_size"] = image_size
    if not pretrained:
        return builder(weights=None, **kwargs)
    try:
        return builder(weights=weights, progress=False, **kwargs)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad cached file a RuntimeError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise WeightsError(
            f"Could not load ImageNet weights for {arch} ({type(error).__name__}: {error}). torchvision "
            f"downloads them from {weights.url} into {cache}. Offline, copy that file there (or set TORCH_HOME), "
            "pass --weights PATH to a local .pth state dict, or use --weights none to train from scratch."
        ) from None


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"Could not read weights file {str(path)!r}: {error}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise WeightsError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict.")
    return state


def build_model(
    arch_or_experiment: str,
    num_classes: int = len(CLASSES),
    weights: str | os.PathLike | None = "imagenet",
    freeze_backbone: bool | None = None,
    image_size: int = 224,
) -> Classifier:
    """Build a classifier.

    ``arch_or_experiment`` is an architecture (``resnet152``, ``resnet50``, ``vit_b_16``) or an
    experiment name (which also decides what is frozen). ``weights`` is ``"imagenet"`` (torchvision's
    weight enum, cached under ``TORCH_HOME``), ``"none"``/None (random initialisation) or a path to a
    local ``.pth`` file: a torchvision state dict or one of our checkpoints.
    """
    from .config import EXPERIMENTS

    if arch_or_experiment in EXPERIMENTS:
        experiment = EXPERIMENTS[arch_or_experiment]
        arch = experiment.arch
        freeze_backbone = experiment.freeze_backbone if freeze_backbone is None else freeze_backbone
    elif arch_or_experiment in ARCHITECTURES:
        arch = arch_or_experiment
    else:
        raise KeyError(f"unknown model {arch_or_experiment!r}; choose from {sorted(ARCHITECTURES) + sorted(EXPERIMENTS)}")
    weights = "none" if weights is None else str(weights)
    _, _, head_name, feature_dim = ARCHITECTURES[arch]
    backbone = _backbone(arch, pretrained=weights == "imagenet", image_size=image_size)
    head = nn.Linear(feature_dim, num_classes)
    if weights not in ("imagenet", "none"):
        state = _load_state_dict_file(Path(weights))
        if any(k.startswith("backbone.") for k in state):
            setattr(backbone, head_name, nn.Identity())
            classifier = Classifier(backbone, head, arch, bool(freeze_backbone))
            try:
                classifier.load_state_dict(state)
            except RuntimeError as error:
                raise WeightsError(f"{weights!r} does not fit {arch} with {num_classes} classes: {error}") from None
            return classifier
        try:
            backbone.load_state_dict(state)
        except RuntimeError as error:
            raise WeightsError(f"{weights!r} is not a torchvision {arch} state dict: {error}") from None
    setattr(backbone, head_name, nn.Identity())
    return Classifier(backbone, head, arch, bool(freeze_backbone))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def needs_batchnorm_statistics(model: Classifier, weights: str | os.PathLike | None) -> bool:
    """A frozen backbone from random weights whose BatchNorm layers still hold their initial statistics.

    Kept in eval mode, BatchNorm with running mean 0 and variance 1 normalises nothing, so activations grow
    block after block: a frozen random ResNet152 feeds its head features of order 1e6 and training diverges.
    Pretrained (or local) weights bring their own statistics, which stay as they are."""
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.backbone.modules())
    return model.freeze_backbone and str(weights).lower() == "none" and has_batchnorm


@torch.no_grad()
def estimate_batchnorm_statistics(backbone: nn.Module, batches: Any, device: torch.device) -> None:
    """Replace the backbone's BatchNorm running statistics by their average over ``batches`` of images
    (torch's ``update_bn``: only buffers change, never a weight), then put the backbone back in eval mode."""
    torch.optim.swa_utils.update_bn(batches, backbone, device)
    backbone.eval()
