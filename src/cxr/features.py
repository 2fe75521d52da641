"""Never redo a frozen backbone's work: its outputs for un-augmented images are computed once.

A frozen backbone (eval mode, no gradients) maps the same image to the same features every epoch, so
for every split that is not augmented (validation always, training when ``augment`` is off) ``fit``
runs the backbone once, keeps the features on the device and trains and evaluates the head on them:
an epoch then costs a few small matrix multiplications. The head sees exactly the inputs the full
forward pass would give it.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .augment import DeviceDataset


@torch.no_grad()  # not inference_mode: the head's backward pass must be able to save these tensors
def extract_features(
    backbone: nn.Module, loader: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None,
    description: str = "features", progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone outputs and labels for every sample of ``loader``, in order, on ``device``."""
    was_training = backbone.training
    backbone.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    features, labels = [], []
    for images, targets in tqdm(loader, desc=description, leave=False, disable=not progress):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        with autocast:
            features.append(backbone(images))
        labels.append(targets.to(device, non_blocking=True))
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


def feature_dataset(
    backbone: nn.Module, loader: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None,
    description: str = "features", progress: bool = True,
) -> DeviceDataset:
    """A split's backbone features as a :class:`DeviceDataset` the head trains or is evaluated on."""
    return DeviceDataset(*extract_features(backbone, loader, device, amp_dtype, description, progress))
