"""Never redo a frozen backbone's work: its outputs for un-augmented images are computed once.

A frozen backbone (eval mode, no gradients) maps the same image to the same features every epoch, so
for every split that is not augmented (validation always, training when ``augment`` is off) ``fit``
runs the backbone once, keeps the features on the device and trains and evaluates the head on them:
an epoch then costs a few small matrix multiplications. The head sees exactly the inputs the full
forward pass would give it. The features are kept in float32 whatever the autocast precision: they
are what the head's fp32 weights multiply.

Augmented training images change every epoch, so there the backbone runs every step; it runs on
larger batches than the head steps on (:class:`FrozenBackboneBatches`).
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch
from torch import nn
from cxr.common.progress import tqdm

from cxr.data.augment import DeviceDataset
from cxr.common.runtime import Runtime


@torch.no_grad()  # not inference_mode: the head's backward pass must be able to save these tensors
def extract_features(
    backbone: nn.Module, loader: Iterable, runtime: Runtime, description: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone outputs and labels for every sample of ``loader``, in order, on ``runtime.device``."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for images, targets in tqdm(loader, desc=description, leave=False, disable=not runtime.progress):
        with runtime.tuning(len(targets), getattr(loader, "batch_size", None)), runtime.autocast():
            features.append(backbone(runtime.to_device(images)).float())
        labels.append(runtime.to_device(targets))
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


def feature_dataset(backbone: nn.Module, loader: Iterable, runtime: Runtime, description: str = "features") -> DeviceDataset:
    """A split's backbone features as a :class:`DeviceDataset` the head trains or is evaluated on."""
    return DeviceDataset(*extract_features(backbone, loader, runtime, description))


class FrozenBackboneBatches:
    """The head's training batches from a frozen backbone, computed on larger batches.

    The backbone only runs forward (eval mode, no autograd, no activations kept), and a GPU runs that best
    on hundreds of images at once; the head must still step every ``step_batch`` images. So ``loader``
    yields batches of a multiple of ``step_batch``, the backbone turns each into features, and they are cut
    into ``step_batch`` pieces. The loader's order is the sampler's permutation whatever its batch size, so
    the head steps on exactly the batches a ``step_batch`` loader would give it: the recipe is unchanged."""

    def __init__(self, backbone: nn.Module, loader: Iterable, runtime: Runtime, step_batch: int) -> None:
        if loader.batch_size % step_batch:
            raise ValueError(f"the backbone's batch ({loader.batch_size}) must be a multiple of the head's "
                             f"({step_batch})")
        self.backbone, self.loader, self.runtime, self.step_batch = backbone, loader, runtime, step_batch
        self.batch_size = step_batch  # what train_one_epoch calls a full batch

    def __len__(self) -> int:
        return math.ceil(len(self.loader.sampler) / self.step_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            with torch.no_grad(), self.runtime.tuning(len(labels), self.loader.batch_size), self.runtime.autocast():
                features = self.backbone(self.runtime.to_device(images))
            yield from zip(features.split(self.step_batch), self.runtime.to_device(labels).split(self.step_batch))
