"""Batched transforms on device tensors, and a loader that slices whole-split tensors.

With the decoded-image cache a split is one uint8 tensor ``(N, 1, S, S)`` that sits on the GPU; a batch
is an index into it, and its augmentation is a handful of kernels for the whole batch: one
``affine_grid`` + ``grid_sample`` applies each image's own random resized crop, horizontal flip,
rotation and translation in a single resampling, then brightness, contrast and normalisation follow
as element-wise ops. The random parameters come from a seeded ``torch.Generator`` on the device, so
an epoch's augmentation depends only on its seed (see ``engine.epoch_seed``).

The operations are ``config.AUGMENTATION``'s, each written once in :mod:`cxr.data.augment_ops` beside the
torchvision reference that ``data.build_transforms`` chains.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from cxr.data import augment_ops
from cxr.config import AUGMENTATION, Augmentation
from cxr.common.distributed import rank_seed
from cxr.data.layout import IMAGENET_MEAN, IMAGENET_STD
from cxr.common.runtime import Runtime

BatchTransform = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


@functools.lru_cache(maxsize=16)
def _statistics(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype: torch.dtype):
    """Mean and std as device tensors, made once: a host-to-device copy per batch would stall the
    host until the device has finished all queued work."""
    shape = (1, len(mean), 1, 1)
    return (torch.tensor(mean, dtype=dtype).view(shape).to(device),
            torch.tensor(std, dtype=dtype).view(shape).to(device))


def _normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], channels_last: bool) -> torch.Tensor:
    """[0, 1] images -> normalised 3-channel float images (grayscale expanded), in the model's memory format."""
    mean_t, std_t = _statistics(tuple(mean), tuple(std), images.device, images.dtype)
    if images.shape[1] == 1:
        images = images.expand(-1, len(mean), -1, -1)
    images = (images - mean_t) / std_t
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@dataclass(frozen=True)
class TrainAugment:
    """The operations of ``augmentation`` (:mod:`cxr.data.augment_ops`), then normalisation, on a uint8 batch
    ``(B, C, S, S)``; returns float ``(B, 3, image_size, image_size)``."""

    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    augmentation: Augmentation = AUGMENTATION
    channels_last: bool = False

    def affine(self, batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Per-image ``(B, 2, 3)`` matrices mapping output to input coordinates (``affine_grid``'s
        normalised [-1, 1] frame; the images are square, so rotations keep their shape): the geometric
        operations' matrices, the first one applied outermost."""
        geometric = [op for op in augment_ops.operations(self.augmentation)
                     if isinstance(op, augment_ops.GeometricOperation)]
        u = torch.rand(batch, sum(op.draws for op in geometric), generator=generator, device=device)
        theta = torch.eye(3, device=device).expand(batch, 3, 3)
        for op, draws in zip(reversed(geometric), reversed(_columns(geometric, u))):
            theta = augment_ops.compose(op.matrix(draws), theta)
        return theta[:, :2]

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        batch, channels = images.shape[:2]
        theta = self.affine(batch, generator, images.device)
        grid = F.affine_grid(theta, [batch, channels, self.image_size, self.image_size], align_corners=False)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False) / 255
        exposure = [op for op in augment_ops.operations(self.augmentation)
                    if isinstance(op, augment_ops.ExposureOperation)]
        if exposure:
            u = torch.rand(batch, sum(op.draws for op in exposure), 1, 1, 1, generator=generator, device=images.device)
            for op, draws in zip(exposure, _columns(exposure, u)):
                out = op.apply(out, draws)
        return _normalize(out, self.mean, self.std, self.channels_last)


def _columns(ops: list[augment_ops.Operation], u: torch.Tensor) -> list[torch.Tensor]:
    """Each operation's own columns of one draw of uniforms, in list order."""
    return list(u.split([op.draws for op in ops], dim=1))


@dataclass(frozen=True)
class EvalTransform:
    """Resize to ``resize`` and center-crop ``image_size`` (as ``data.build_transforms`` does for
    evaluation), then normalise, on a uint8 batch ``(B, C, S, S)``."""

    image_size: int
    resize: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels_last: bool = False

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        out = images.float() / 255
        if out.shape[-1] != self.resize or out.shape[-2] != self.resize:
            out = F.interpolate(out, size=(self.resize, self.resize), mode="bilinear", antialias=True,
                                align_corners=False).clamp_(0, 1)
        top = int(round((self.resize - self.image_size) / 2.0))
        out = out[..., top:top + self.image_size, top:top + self.image_size]
        return _normalize(out, self.mean, self.std, self.channels_last)


class DeviceDataset:
    """A whole split as two tensors: inputs (uint8 images or backbone features) and labels, on the
    device when they fit. ``transform(batch, generator)`` runs per batch on the device. With
    ``copied_per_batch`` the tensors are in host memory and :class:`DeviceLoader` copies each batch over."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, transform: BatchTransform | None = None,
                 copied_per_batch: bool = False) -> None:
        if len(inputs) != len(labels):
            raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
        self.inputs, self.labels, self.transform = inputs, labels, transform
        self.copied_per_batch = copied_per_batch

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def held_on(self) -> str:
        """Where the split is, for metrics.json."""
        return "host memory, copied to the device per batch" if self.copied_per_batch else self.inputs.device.type

    @classmethod
    def from_images(
        cls, images: np.ndarray, labels: Sequence[int], runtime: Runtime, transform: BatchTransform | None
    ) -> DeviceDataset:
        """Hold a ``(N, S, S)`` uint8 array on the device where it fits (:meth:`Runtime.holds_on_device`),
        else in host memory, copied to the device batch by batch."""
        inputs = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
        targets = torch.as_tensor(list(labels), dtype=torch.long)
        if runtime.holds_on_device(inputs.nbytes):
            return cls(inputs.to(runtime.device), targets.to(runtime.device), transform)
        return cls(inputs, targets, transform, copied_per_batch=True)


class DeviceLoader:
    """Batches of a :class:`DeviceDataset` in a seeded order: an index into tensors already in memory,
    no workers and no collation. Iterating twice yields the same batches. The order comes from a
    ``DistributedSampler``, as in ``pipeline.make_loader``'s DataLoader: with ``world_size`` > 1 this
    loader yields rank ``rank``'s shard of the same permutation (see :mod:`cxr.common.distributed`)."""

    def __init__(self, dataset: DeviceDataset, batch_size: int, shuffle: bool, runtime: Runtime, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.dataset, self.batch_size, self.shuffle, self.runtime, self.seed = dataset, batch_size, shuffle, runtime, seed
        self.rank = rank
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        inputs, labels = self.dataset.inputs, self.dataset.labels
        order = torch.as_tensor(list(self.sampler), dtype=torch.long, device=inputs.device)
        device = self.runtime.device
        generator = torch.Generator(device=device).manual_seed(rank_seed(self.seed, self.rank))
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            batch, targets = inputs.index_select(0, index), labels.index_select(0, index)
            if self.dataset.copied_per_batch:
                batch, targets = self.runtime.copy_batch(batch), self.runtime.copy_batch(targets)
            if self.dataset.transform is not None:
                batch = self.dataset.transform(batch, generator)
            yield batch, targets
