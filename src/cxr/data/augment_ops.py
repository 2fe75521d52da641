"""The training augmentation's operations, each written once: its on-device version beside its torchvision v2
reference. The list, its order and the parameters are :class:`cxr.config.Augmentation`'s.

On the device (:class:`cxr.data.augment.TrainAugment`) a batch takes one ``torch.rand`` for all geometric
operations and one for all exposure operations, each operation reading its own columns in list order, so
an epoch's draws depend only on its seed. A geometric operation gives per-image ``(B, 3, 3)`` matrices that
map output to input coordinates (``affine_grid``'s normalised [-1, 1] frame); they compose into one
resampling. An exposure operation changes the resampled [0, 1] pixels. The reference transform of each is
what :func:`cxr.data.dataset.build_transforms` chains, and tests/test_augment_ops.py checks that both agree in
distribution, operation by operation.

A new operation: its parameters as a field of :class:`~cxr.config.Augmentation`, one class here, and its
entry in :data:`OPERATIONS`.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torchvision.transforms import v2

from cxr import config


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u


def _matrices(row0: list[Any], row1: list[Any]) -> torch.Tensor:
    """``(B, 3, 3)`` affine matrices from two rows of per-image tensors or numbers (the third row 0, 0, 1)."""
    like = next(v for v in row0 + row1 if isinstance(v, torch.Tensor))
    full = [[v if isinstance(v, torch.Tensor) else torch.full_like(like, v) for v in row] for row in
            (row0, row1, [0.0, 0.0, 1.0])]
    return torch.stack([torch.stack(row, 1) for row in full], 1)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """``outer @ inner`` for ``(B, 3, 3)`` matrices, as element-wise products and a sum. For the crop, flip
    and affine of the list every entry sums at most two non-zero products, rounded once, so the matrices
    are bit for bit those of the closed-form formula they replace (a batched matmul may fuse a multiply and
    an add, and round differently)."""
    return (outer.unsqueeze(-1) * inner.unsqueeze(-3)).sum(-2)


class Operation(abc.ABC):
    """One augmentation operation: ``draws`` uniform numbers per image; ``resizes``: its reference sets the
    output size."""

    draws: ClassVar[int]
    resizes: ClassVar[bool] = False

    @abc.abstractmethod
    def reference(self, image_size: int) -> v2.Transform:
        """The torchvision v2 transform of one image that this operation equals in distribution."""


class GeometricOperation(Operation):
    """Moves pixels: its matrices compose with the other geometric operations' into one resampling."""

    @abc.abstractmethod
    def matrix(self, u: torch.Tensor) -> torch.Tensor:
        """``(B, draws)`` uniforms -> ``(B, 3, 3)`` output-to-input matrices."""


class ExposureOperation(Operation):
    """Changes pixel values, after the resampling."""

    @abc.abstractmethod
    def apply(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` [0, 1] images and ``(B, draws, 1, 1, 1)`` uniforms -> the changed images."""


@dataclass(frozen=True)
class ResizedCrop(GeometricOperation):
    """A random part of ``scale`` of the area at an aspect ratio in ``ratio`` (drawn on a log scale)."""

    params: config.ResizedCrop
    draws: ClassVar[int] = 4
    resizes: ClassVar[bool] = True

    def matrix(self, u: torch.Tensor) -> torch.Tensor:
        p = self.params
        area = _uniform(u[:, 0], *p.scale)
        ratio = torch.exp(_uniform(u[:, 1], math.log(p.ratio[0]), math.log(p.ratio[1])))
        width, height = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
        centre_x, centre_y = (1 - width) * _uniform(u[:, 2], -1, 1), (1 - height) * _uniform(u[:, 3], -1, 1)
        return _matrices([width, 0.0, centre_x], [0.0, height, centre_y])

    def reference(self, image_size: int) -> v2.Transform:
        return v2.RandomResizedCrop(image_size, scale=self.params.scale, ratio=self.params.ratio, antialias=True)


@dataclass(frozen=True)
class HorizontalFlip(GeometricOperation):
    """Mirror left-right with ``probability`` (never top-bottom)."""

    params: config.HorizontalFlip
    draws: ClassVar[int] = 1

    def matrix(self, u: torch.Tensor) -> torch.Tensor:
        flip = torch.where(u[:, 0] < self.params.probability, -1.0, 1.0)
        return _matrices([flip, 0.0, 0.0], [0.0, 1.0, 0.0])

    def reference(self, image_size: int) -> v2.Transform:
        return v2.RandomHorizontalFlip(self.params.probability)


@dataclass(frozen=True)
class Affine(GeometricOperation):
    """Rotate by up to +-``degrees`` about the centre, then shift by up to +-``translate`` of the side."""

    params: config.Affine
    draws: ClassVar[int] = 3

    def matrix(self, u: torch.Tensor) -> torch.Tensor:
        p = self.params
        angle = math.radians(p.degrees) * _uniform(u[:, 0], -1, 1)
        shift_x, shift_y = 2 * p.translate * _uniform(u[:, 1], -1, 1), 2 * p.translate * _uniform(u[:, 2], -1, 1)
        cos, sin = angle.cos(), angle.sin()
        # input = rotate^-1(output - shift), as RandomAffine rotates, then translates
        return _matrices([cos, sin, -(cos * shift_x + sin * shift_y)], [-sin, cos, sin * shift_x - cos * shift_y])

    def reference(self, image_size: int) -> v2.Transform:
        return v2.RandomAffine(degrees=self.params.degrees, translate=(self.params.translate, self.params.translate),
                               interpolation=v2.InterpolationMode.BILINEAR)  # as the device resamples


@dataclass(frozen=True)
class Brightness(ExposureOperation):
    """Multiply every pixel by one factor in 1 +- ``strength``."""

    params: config.Brightness
    draws: ClassVar[int] = 1

    def apply(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return (images * _uniform(u[:, 0], 1 - self.params.strength, 1 + self.params.strength)).clamp_(0, 1)

    def reference(self, image_size: int) -> v2.Transform:
        return v2.ColorJitter(brightness=self.params.strength)


@dataclass(frozen=True)
class Contrast(ExposureOperation):
    """Scale every pixel's distance from the image's mean by one factor in 1 +- ``strength``."""

    params: config.Contrast
    draws: ClassVar[int] = 1

    def apply(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        factor = _uniform(u[:, 0], 1 - self.params.strength, 1 + self.params.strength)
        return ((images - mean) * factor + mean).clamp_(0, 1)

    def reference(self, image_size: int) -> v2.Transform:
        return v2.ColorJitter(contrast=self.params.strength)


OPERATIONS: dict[type, type[Operation]] = {
    config.ResizedCrop: ResizedCrop,
    config.HorizontalFlip: HorizontalFlip,
    config.Affine: Affine,
    config.Brightness: Brightness,
    config.Contrast: Contrast,
}


def operations(augmentation: config.Augmentation) -> list[Operation]:
    """The augmentation's operations, in order, ready to run. The device resamples once for all geometric
    operations before it changes any pixel, so each geometric one must come before every exposure one."""
    ops = [OPERATIONS[type(params)](params) for params in augmentation.operations()]
    kinds = [isinstance(op, GeometricOperation) for op in ops]
    if kinds != sorted(kinds, reverse=True):
        raise ValueError("augmentation: every geometric operation must come before the exposure ones, "
                         f"not {', '.join(type(op).__name__ for op in ops)}")
    return ops


def reference_transforms(image_size: int, augmentation: config.Augmentation) -> list[v2.Transform]:
    """The operations' torchvision references, in order; the image is resized to ``image_size`` first when
    none of them resizes it (the device resamples to that size in any case)."""
    ops = operations(augmentation)
    resize = [] if any(op.resizes for op in ops) else [v2.Resize([image_size, image_size], antialias=True)]
    return resize + [op.reference(image_size) for op in ops]
