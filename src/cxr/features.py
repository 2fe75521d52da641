"""Never redo a frozen backbone's work: its outputs for un-augmented images are computed once.

A frozen backbone (eval mode, no gradients) maps the same image to the same features every epoch, so
for every split that is not augmented (validation always, training when ``augment`` is off) ``fit``
runs the backbone once, keeps the features on the device and trains and evaluates the head on them:
an epoch then costs a few small matrix multiplications. The head sees exactly the inputs the full
forward pass would give it. The features are kept in float32 whatever the autocast precision: they
are what the head's fp32 weights multiply.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .augment import DeviceDataset
from .runtime import Runtime


@torch.no_grad()  # not inference_mode: the head's backward pass must be able to save these tensors
def extract_features(
    backbone: nn.Module, loader: Iterable, runtime: Runtime, description: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone outputs and labels for every sample of ``loader``, in order, on ``runtime.device``."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for images, targets in tqdm(loader, desc=description, leave=False, disable=not runtime.progress):
        with runtime.autocast():
            features.append(backbone(runtime.to_device(images)).float())
        labels.append(runtime.to_device(targets))
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


def feature_dataset(backbone: nn.Module, loader: Iterable, runtime: Runtime, description: str = "features") -> DeviceDataset:
    """A split's backbone features as a :class:`DeviceDataset` the head trains or is evaluated on."""
    return DeviceDataset(*extract_features(backbone, loader, runtime, description))
