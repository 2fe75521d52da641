"""Each augmentation operation, on the device and as its torchvision reference, agrees in distribution."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from cxr.data import augment_ops
from cxr.data.augment import TrainAugment
from cxr.config import AUGMENTATION, Affine, Augmentation, Brightness, Contrast, HorizontalFlip, ResizedCrop
from cxr.data.dataset import build_transforms

SIDE, DRAWS = 64, 1000
NOTHING = Augmentation(**{f.name: None for f in dataclasses.fields(Augmentation)})
OPERATIONS = [f.name for f in dataclasses.fields(Augmentation)]


def _image() -> torch.Tensor:
    """A smooth ``(1, SIDE, SIDE)`` uint8 image with a bright spot up and left and a gradient towards the
    bottom right: no flip, crop, rotation or shift leaves it unchanged."""
    y, x = torch.meshgrid(torch.arange(SIDE).float(), torch.arange(SIDE).float(), indexing="ij")
    spot = 120 * torch.exp(-((x - 20) ** 2 + (y - 24) ** 2) / 120)
    return (60 + spot + 1.5 * y + 0.75 * x).round().clamp(0, 255).to(torch.uint8)[None]


def _on_device(augmentation: Augmentation, seed: int = 0) -> torch.Tensor:
    """``DRAWS`` augmented copies of the image from :class:`TrainAugment`, in [0, 1]."""
    batch = _image().expand(DRAWS, 1, SIDE, SIDE)
    return TrainAugment(SIDE, (0.0,), (1.0,), augmentation)(batch, torch.Generator().manual_seed(seed))[:, 0]


def _by_reference(augmentation: Augmentation, seed: int = 1) -> torch.Tensor:
    """``DRAWS`` copies from ``data.build_transforms``'s torchvision chain (float input: no uint8 rounding)."""
    transform = build_transforms(SIDE, True, mean=[0.0], std=[1.0], augmentation=augmentation)
    torch.manual_seed(seed)
    image = _image().float() / 255
    return torch.stack([transform(image) for _ in range(DRAWS)])[:, 0]


def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far apart two sets of draws are: the mean absolute difference of their per-pixel means plus
    that of their per-pixel standard deviations."""
    return float((a.mean(0) - b.mean(0)).abs().mean() + (a.std(0) - b.std(0)).abs().mean())


def _only(name: str, params=None) -> Augmentation:
    return dataclasses.replace(NOTHING, **{name: params or getattr(AUGMENTATION, name)})


@pytest.mark.parametrize("name", OPERATIONS)
def test_device_operation_and_its_torchvision_reference_agree_in_distribution(name):
    """Each operation alone, as configured: the two sets of draws differ by under a fifth of what the
    operation changes (torchvision cuts crops and shifts at whole pixels; the device does not)."""
    device, reference = _on_device(_only(name)), _by_reference(_only(name))
    unchanged = (_image()[0].float() / 255).expand(DRAWS, SIDE, SIDE)
    change = _difference(device, unchanged)
    assert change > 0.01, f"{name} leaves the image as it is"
    assert _difference(device, reference) < 0.2 * change


@pytest.mark.parametrize("name, stronger", [
    ("resized_crop", ResizedCrop(scale=(0.4, 1.0))), ("horizontal_flip", HorizontalFlip(1.0)),
    ("affine", Affine(degrees=14.0, translate=0.08)), ("brightness", Brightness(0.4)), ("contrast", Contrast(0.4)),
])
def test_the_comparison_catches_a_device_operation_twice_as_strong(name, stronger):
    device, reference = _on_device(_only(name, stronger)), _by_reference(_only(name))
    unchanged = (_image()[0].float() / 255).expand(DRAWS, SIDE, SIDE)
    assert _difference(device, reference) > 0.2 * _difference(_on_device(_only(name)), unchanged)


def test_every_listed_operation_has_a_device_version_and_a_reference():
    ops = augment_ops.operations(AUGMENTATION)
    assert [type(op.params) for op in ops] == [type(getattr(AUGMENTATION, name)) for name in OPERATIONS]
    references = build_transforms(32, train=True).transforms[1:-2]
    assert [type(t) for t in references] == [type(op.reference(32)) for op in ops]


def test_no_vertical_flip_in_the_list():
    """Chest X-rays have a top and a bottom: no operation keeps the image's top at the bottom, whatever it
    draws, and the reference chain has no vertical flip."""
    for op in augment_ops.operations(AUGMENTATION):
        if isinstance(op, augment_ops.GeometricOperation):
            for u in (torch.zeros(8, op.draws), torch.ones(8, op.draws), torch.rand(8, op.draws)):
                assert (op.matrix(u)[:, 1, 1] > 0).all(), type(op).__name__
    assert not any("Vertical" in type(t).__name__ for t in build_transforms(32, train=True).transforms)


def test_geometric_operations_come_before_exposure_ones():
    exposure_only = Augmentation(resized_crop=None, horizontal_flip=None, affine=None)
    assert [type(op).__name__ for op in augment_ops.operations(exposure_only)] == ["Brightness", "Contrast"]
    exposure_first = SimpleNamespace(operations=lambda: (Brightness(), Affine()))
    with pytest.raises(ValueError, match="every geometric operation must come before the exposure ones"):
        augment_ops.operations(exposure_first)


def test_the_composed_matrices_are_the_closed_form_bit_for_bit():
    """One draw of 8 uniforms per image, read in list order (crop 4, flip 1, affine 3), composed into
    crop(flip(rotate^-1(output - shift))): the formula, column order and rounding of the augmentation
    before its operations were listed, so a fixed-seed run draws and trains exactly as it did."""
    import math

    a = AUGMENTATION
    u = torch.rand(64, 8, generator=torch.Generator().manual_seed(11))
    area = a.resized_crop.scale[0] + (a.resized_crop.scale[1] - a.resized_crop.scale[0]) * u[:, 0]
    low, high = math.log(a.resized_crop.ratio[0]), math.log(a.resized_crop.ratio[1])
    ratio = torch.exp(low + (high - low) * u[:, 1])
    width, height = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    centre_x, centre_y = (1 - width) * (-1 + 2 * u[:, 2]), (1 - height) * (-1 + 2 * u[:, 3])
    flip = torch.where(u[:, 4] < a.horizontal_flip.probability, -1.0, 1.0)
    angle = math.radians(a.affine.degrees) * (-1 + 2 * u[:, 5])
    shift_x, shift_y = 2 * a.affine.translate * (-1 + 2 * u[:, 6]), 2 * a.affine.translate * (-1 + 2 * u[:, 7])
    cos, sin = angle.cos(), angle.sin()
    expected = torch.stack([
        torch.stack([width * flip * cos, width * flip * sin, width * flip * -(cos * shift_x + sin * shift_y) + centre_x], 1),
        torch.stack([height * -sin, height * cos, height * (sin * shift_x - cos * shift_y) + centre_y], 1),
    ], 1)
    theta = TrainAugment(32).affine(64, torch.Generator().manual_seed(11), torch.device("cpu"))
    assert torch.equal(theta, expected)
