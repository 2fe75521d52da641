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

from .config import TrainableBlocks
from .data import CLASSES, IMAGENET_MEAN, IMAGENET_STD

ARCHITECTURES: dict[str, tuple[Any, Any, str, int]] = {
    "resnet152": (tvm.resnet152, tvm.ResNet152_Weights.DEFAULT, "fc", 2048),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.DEFAULT, "fc", 2048),
    "vit_b_16": (tvm.vit_b_16, tvm.ViT_B_16_Weights.DEFAULT, "heads", 768),
}


# Input sizes a run may ask for. Below 32 px a ResNet's 32x downsampling leaves a single feature pixel and
# training stays at chance (--image-size 1 did, without a word); above 1024 px the decoded-image cache of a
# Kaggle-sized set (7,000 squares of 1170 px) needs 9.6 GB and 100,000 px asked numpy for 438 GiB.

class WeightsError(RuntimeError):
    """Pretrained weights cannot be obtained or do not fit; the message says what to do."""


def trainable_parts(backbone: nn.Module, arch: str, blocks: TrainableBlocks) -> list[nn.Module]:
    """The backbone modules that learn for ``blocks``: none (0), the last ``blocks`` residual blocks
    (ResNet) or encoder layers plus the final LayerNorm (ViT), or the whole backbone (``"all"``)."""
    if blocks == "all":
        return [backbone]
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
        raise ValueError(f"trainable_blocks must be a whole number >= 0 or 'all', not {blocks!r}")
    if arch.startswith("vit"):
        layers, final = list(backbone.encoder.layers), [backbone.encoder.ln]
    else:
        layers, final = [block for stage in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
                         for block in stage], []
    if blocks > len(layers):
        raise ValueError(f"trainable_blocks={blocks}, but {arch} has {len(layers)} blocks")
    return layers[len(layers) - blocks:] + final if blocks else []


def as_trainable_blocks(value: TrainableBlocks | bool | None) -> TrainableBlocks:
    """``trainable_blocks`` from what callers pass: a bool is the old ``freeze_backbone`` flag (True: 0,
    False: ``"all"``), None the default (``"all"``)."""
    if value is None or value is False:
        return "all"
    return 0 if value is True else value


class Classifier(nn.Module):
    """Backbone + new head. ``trainable_blocks`` says how much of the backbone learns (see
    :func:`trainable_parts`). The frozen parts stay in eval mode (BatchNorm statistics and dropout
    fixed) and get no gradients; a wholly frozen backbone (``trainable_blocks=0``) also runs without
    autograd during training, so only the head learns."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, arch: str, trainable_blocks: TrainableBlocks = "all",
                 ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.arch = arch
        self.trainable_blocks = trainable_blocks
        self._trained_parts = trainable_parts(backbone, arch, trainable_blocks)
        if trainable_blocks != "all":
            self.backbone.requires_grad_(False)
            for part in self._trained_parts:
                part.requires_grad_(True)
            self.train(self.training)

    @property
    def freeze_backbone(self) -> bool:
        """The whole backbone is frozen: only the head learns, so the backbone's features can be cached."""
        return self.trainable_blocks == 0

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.trainable_blocks != "all":
            self.backbone.eval()
            for part in self._trained_parts:
                part.train(mode)
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
    """A plain state dict (or one of our checkpoints), read without running any pickled code."""
    from .torchfile import archive_problem, load_problem

    problem = archive_problem(path)
    if problem is not None:
        raise WeightsError(f"Could not read weights file {str(path)!r}: it {problem}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        problem = load_problem(error)
        plain = "is not a plain state dict: it " if problem.startswith("holds objects") else ""
        raise WeightsError(f"Could not read weights file {str(path)!r}: it {plain}{problem}.") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise WeightsError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict.")
    return state


def build_model(
    arch_or_experiment: str,
    num_classes: int = len(CLASSES),
    weights: str | os.PathLike | None = "imagenet",
    trainable_blocks: TrainableBlocks | bool | None = None,
    image_size: int = 224,
) -> Classifier:
    """Build a classifier.

    ``arch_or_experiment`` is an architecture (``resnet152``, ``resnet50``, ``vit_b_16``) or an
    experiment name (which also decides how much of the backbone trains, unless ``trainable_blocks``
    is given; see :func:`as_trainable_blocks`). ``weights`` is ``"imagenet"`` (torchvision's
    weight enum, cached under ``TORCH_HOME``), ``"none"``/None (random initialisation) or a path to a
    local ``.pth`` file: a torchvision state dict or one of our checkpoints.
    """
    from .config import EXPERIMENTS

    if arch_or_experiment in EXPERIMENTS:
        experiment = EXPERIMENTS[arch_or_experiment]
        arch = experiment.arch
        trainable_blocks = experiment.trainable_blocks if trainable_blocks is None else trainable_blocks
    elif arch_or_experiment in ARCHITECTURES:
        arch = arch_or_experiment
    else:
        raise KeyError(f"unknown model {arch_or_experiment!r}; choose from {sorted(ARCHITECTURES) + sorted(EXPERIMENTS)}")
    weights = "none" if weights is None else str(weights)
    trainable_blocks = as_trainable_blocks(trainable_blocks)
    _, _, head_name, feature_dim = ARCHITECTURES[arch]
    backbone = _backbone(arch, pretrained=weights == "imagenet", image_size=image_size)
    head = nn.Linear(feature_dim, num_classes)
    if weights not in ("imagenet", "none"):
        state = _load_state_dict_file(Path(weights))
        if any(k.startswith("backbone.") for k in state):
            setattr(backbone, head_name, nn.Identity())
            classifier = Classifier(backbone, head, arch, trainable_blocks)
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
    return Classifier(backbone, head, arch, trainable_blocks)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def needs_batchnorm_statistics(model: Classifier, weights: str | os.PathLike | None) -> bool:
    """A backbone from random weights whose frozen BatchNorm layers still hold their initial statistics.

    Kept in eval mode, BatchNorm with running mean 0 and variance 1 normalises nothing, so activations grow
    block after block: a frozen random ResNet152 feeds its head features of order 1e6 and training diverges.
    Pretrained (or local) weights bring their own statistics, which stay as they are."""
    frozen_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.weight.requires_grad
                           for m in model.backbone.modules())
    return str(weights).lower() == "none" and frozen_batchnorm


@torch.no_grad()
def estimate_batchnorm_statistics(backbone: nn.Module, batches: Any, device: torch.device) -> None:
    """Replace the backbone's BatchNorm running statistics by their average over ``batches`` of images
    (torch's ``update_bn``: only buffers change, never a weight), then put the backbone back in eval mode."""
    torch.optim.swa_utils.update_bn(batches, backbone, device)
    backbone.eval()
