"""The backbone registry: every fact the package needs about one torchvision architecture, in one place.

A :class:`Backbone` says how to build the network (a torchvision builder and its ImageNet weight enum, both
named as text so this module imports neither torch nor torchvision, and the argument checks that read it
run before the heavy imports), which attribute holds torchvision's own head and how wide the features
entering it are, what "the last N blocks" means (``trainable_blocks``), where Grad-CAM looks, and which
input sizes it takes. Adding a backbone is one entry in :data:`BACKBONES` plus one experiment in
:mod:`cxr.config`; the tests that run every experiment pick it up by themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

Blocks = Callable[[Any], tuple[list[Any], list[Any]]]


@dataclass(frozen=True)
class Backbone:
    """One architecture. ``blocks(backbone)`` gives its blocks in input-to-output order and the modules that
    train with any of them (a ViT's final LayerNorm, a MobileNetV2's last 1x1 convolution);
    ``cam_layer(backbone)`` the module Grad-CAM reads, whose output is a (B, 1 + h*w, D) token sequence
    when ``cam_tokens`` is set. ``patch``: the input side must be a multiple of it. ``sized_at_build``: the
    builder takes ``image_size`` (a ViT's position embeddings), so pretrained weights fix it at
    ``pretrained_size``. ``reference_layout``: a local state dict with other key names is accepted when it
    holds the same tensors with the same shapes in the same order (see :mod:`cxr.models.local_weights`)."""

    name: str
    label: str  # how a reader names it
    builder: str  # a function in torchvision.models
    weights: str  # its ImageNet weight enum member in torchvision.models, e.g. "ResNet50_Weights.DEFAULT"
    head: str  # attribute of torchvision's model holding its own classifier (replaced by nn.Identity)
    feature_dim: int  # width of the pooled features (or class token) the new head reads
    blocks: Blocks
    cam_layer: Callable[[Any], Any]
    cam_tokens: bool = False
    patch: int | None = None
    sized_at_build: bool = False
    pretrained_size: int = 224
    reference_layout: bool = False


def _resnet_blocks(backbone: Any) -> tuple[list[Any], list[Any]]:
    stages = (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
    return [block for stage in stages for block in stage], []


def _vit_blocks(backbone: Any) -> tuple[list[Any], list[Any]]:
    return list(backbone.encoder.layers), [backbone.encoder.ln]


def _mobilenet_v2_blocks(backbone: Any) -> tuple[list[Any], list[Any]]:
    """The 17 inverted-residual blocks (``features[1:18]``); the stem stays with them, the final 1x1
    convolution to 1280 channels (``features[18]``) trains whenever any block does, as a ViT's final norm."""
    return list(backbone.features[1:-1]), [backbone.features[-1]]


BACKBONES: dict[str, Backbone] = {
    spec.name: spec
    for spec in (
        Backbone("resnet152", "ResNet152", "resnet152", "ResNet152_Weights.DEFAULT", "fc", 2048,
                 _resnet_blocks, lambda backbone: backbone.layer4),
        Backbone("resnet50", "ResNet50", "resnet50", "ResNet50_Weights.DEFAULT", "fc", 2048,
                 _resnet_blocks, lambda backbone: backbone.layer4),
        # Grad-CAM reads the input of the last block's attention: only the class token reaches the head
        # from the block's output, so every patch token's gradient there is zero.
        Backbone("vit_b_16", "ViT-B/16", "vit_b_16", "ViT_B_16_Weights.DEFAULT", "heads", 768,
                 _vit_blocks, lambda backbone: backbone.encoder.layers[-1].ln_1,
                 cam_tokens=True, patch=16, sized_at_build=True),
        Backbone("mobilenet_v2", "MobileNetV2", "mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V2", "classifier",
                 1280, _mobilenet_v2_blocks, lambda backbone: backbone.features[-1], reference_layout=True),
    )
}


def get_backbone(name: str) -> Backbone:
    """The registry entry for ``name``; a KeyError naming the known ones otherwise."""
    if name not in BACKBONES:
        raise KeyError(f"unknown architecture {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]
