"""Build the classifiers from torchvision backbones (the architectures in :mod:`cxr.models.backbones`).

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

from cxr.models.backbones import BACKBONES, Backbone, get_backbone
from cxr.config import TrainableBlocks
from cxr.data.layout import IMAGENET_MEAN, IMAGENET_STD
from cxr.data.layout import CLASSES
from cxr.models.local_weights import WeightsError, backbone_state, is_classifier_state, match_tensors, read_state_dict

__all__ = ["BACKBONES", "Classifier", "WeightsError", "build_model", "check_weights", "trainable_parts"]


def trainable_parts(backbone: nn.Module, arch: str, blocks: TrainableBlocks) -> list[nn.Module]:
    """The backbone modules that learn for ``blocks``: none (0), the last ``blocks`` of the registry's blocks
    (ResNet: residual blocks; ViT: encoder layers; MobileNetV2: inverted residuals) with the modules that train
    with any of them (ViT's final LayerNorm, MobileNetV2's last convolution), or the whole backbone (``"all"``)."""
    if blocks == "all":
        return [backbone]
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
        raise ValueError(f"trainable_blocks must be a whole number >= 0 or 'all', not {blocks!r}")
    layers, final = get_backbone(arch).blocks(backbone)
    if blocks > len(layers):
        raise ValueError(f"trainable_blocks={blocks}, but {arch} has {len(layers)} blocks")
    return layers[len(layers) - blocks:] + final if blocks else []


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


def default_weights(arch: str) -> Any:
    """torchvision's weight enum for an architecture (it names the download URL and preprocessing)."""
    enum, member = get_backbone(arch).weights.split(".")
    return getattr(getattr(tvm, enum), member)


def preprocessing(arch: str, image_size: int) -> dict[str, Any]:
    """Normalisation and resize taken from the pretrained weights' own transforms, scaled to ``image_size``."""
    transforms = default_weights(arch).transforms()
    resize = round(image_size * transforms.resize_size[0] / transforms.crop_size[0])
    mean = tuple(transforms.mean) if transforms.mean else IMAGENET_MEAN
    std = tuple(transforms.std) if transforms.std else IMAGENET_STD
    return {"image_size": image_size, "resize": resize, "mean": list(mean), "std": list(std)}


def _backbone(spec: Backbone, pretrained: bool, image_size: int) -> nn.Module:
    builder, weights = getattr(tvm, spec.builder), default_weights(spec.name)
    kwargs: dict[str, Any] = {}
    if spec.sized_at_build:
        if pretrained and image_size != spec.pretrained_size:
            raise WeightsError(f"{spec.label} ImageNet weights need --image-size {spec.pretrained_size}, "
                               f"not {image_size}.")
        kwargs["image_size"] = image_size
    if not pretrained:
        return builder(weights=None, **kwargs)
    try:
        return builder(weights=weights, progress=False, **kwargs)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad cached file a RuntimeError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise WeightsError(
            f"Could not load ImageNet weights for {spec.name} ({type(error).__name__}: {error}). torchvision "
            f"downloads them from {weights.url} into {cache}. Offline, copy that file there (or set TORCH_HOME), "
            "pass --weights PATH to a local .pth state dict, or use --weights none to train from scratch."
        ) from None


def build_model(
    arch: str,
    num_classes: int = len(CLASSES),
    weights: str | os.PathLike | None = "imagenet",
    trainable_blocks: TrainableBlocks = "all",
    image_size: int = 224,
) -> Classifier:
    """Build a classifier.

    ``arch`` is a name in :data:`cxr.models.backbones.BACKBONES` (an experiment's model:
    :func:`cxr.workflow.build_experiment_model`); ``trainable_blocks`` says how much of the backbone learns
    (:func:`trainable_parts`). ``weights`` is ``"imagenet"`` (torchvision's
    weight enum, cached under ``TORCH_HOME``), ``"none"``/None (random initialisation) or a path to a
    local file: a backbone state dict (torchvision's layout, or the reference layout where the registry
    allows it) or one of our checkpoints; see :mod:`cxr.models.local_weights`.
    """
    spec = get_backbone(arch)
    weights = "none" if weights is None else str(weights)
    backbone = _backbone(spec, pretrained=weights == "imagenet", image_size=image_size)
    state = None if weights in ("imagenet", "none") else read_state_dict(weights)
    if state is not None and not is_classifier_state(state):
        backbone.load_state_dict(backbone_state(state, backbone.state_dict(), spec, repr(weights)), strict=False)
    setattr(backbone, spec.head, nn.Identity())
    classifier = Classifier(backbone, nn.Linear(spec.feature_dim, num_classes), spec.name, trainable_blocks)
    if state is not None and is_classifier_state(state):
        target = f"a {spec.name} classifier with {num_classes} classes"
        classifier.load_state_dict(match_tensors(state, classifier.state_dict(), False, repr(weights), target))
    return classifier


def check_weights(arch: str, weights: str | os.PathLike | None, num_classes: int = len(CLASSES),
                  image_size: int = 224) -> None:
    """Refuse a local weights file that does not fit ``arch`` (one WeightsError line) without building the
    model's tensors (it is built on the meta device), so a run can check it before writing anything."""
    if weights is None or str(weights) in ("imagenet", "none"):
        return
    spec = get_backbone(arch)
    state = read_state_dict(weights)
    with torch.device("meta"):
        backbone = getattr(tvm, spec.builder)(weights=None, **({"image_size": image_size} if spec.sized_at_build
                                                               else {}))
    if not is_classifier_state(state):
        backbone_state(state, backbone.state_dict(), spec, repr(str(weights)))
        return
    setattr(backbone, spec.head, nn.Identity())
    with torch.device("meta"):
        head = nn.Linear(spec.feature_dim, num_classes)
    expected = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                **{f"head.{k}": v for k, v in head.state_dict().items()}}
    match_tensors(state, expected, False, repr(str(weights)), f"a {spec.name} classifier with {num_classes} classes")


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
