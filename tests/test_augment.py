"""Batched augmentation on device tensors, and the loader that slices cached splits."""

import dataclasses

import numpy as np
import pytest
import torch

from cxr.data.augment import DeviceDataset, DeviceLoader, EvalTransform, TrainAugment
from cxr.config import Affine, Augmentation, Brightness, Contrast, HorizontalFlip, ResizedCrop
from cxr.data.dataset import build_transforms
from cxr.data.layout import IMAGENET_MEAN, IMAGENET_STD
from cxr.common.runtime import Runtime

CPU = Runtime.create("cpu", progress=False)

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
NO_CHANGE = Augmentation(ResizedCrop((1.0, 1.0), (1.0, 1.0)), HorizontalFlip(0.0), Affine(0.0, 0.0), Brightness(0.0),
                         Contrast(0.0))


def _batch(size: int = 37, count: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _unnormalise(images: torch.Tensor) -> torch.Tensor:
    return images * STD + MEAN


def test_train_augment_shape_dtype_range():
    out = TrainAugment(32)(_batch(), torch.Generator().manual_seed(1))
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    pixels = _unnormalise(out)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-5)  # one grayscale image in three channels


def test_train_augment_is_determined_by_the_seed():
    images, augment = _batch(), TrainAugment(32)
    first = augment(images, torch.Generator().manual_seed(7))
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(7)))
    assert not torch.allclose(first, augment(images, torch.Generator().manual_seed(8)))


def test_train_augment_without_randomness_is_the_identity():
    images = _batch(size=32)
    out = TrainAugment(32, augmentation=NO_CHANGE)(images, torch.Generator().manual_seed(0))
    assert torch.allclose(_unnormalise(out)[:, :1], images.float() / 255, atol=1e-5)
    always = dataclasses.replace(NO_CHANGE, horizontal_flip=HorizontalFlip(1.0))
    flipped = TrainAugment(32, augmentation=always)(images, torch.Generator().manual_seed(0))
    assert torch.allclose(_unnormalise(flipped)[:, :1], images.flip(-1).float() / 255, atol=1e-5)


def test_flips_are_horizontal_never_vertical():
    top_bright = torch.zeros(64, 1, 37, 37, dtype=torch.uint8)
    top_bright[:, :, :18] = 200
    out = _unnormalise(TrainAugment(32)(top_bright, torch.Generator().manual_seed(3)))[:, 0]
    assert (out[:, :12].mean(dim=(1, 2)) > out[:, -12:].mean(dim=(1, 2))).all()
    left_bright = top_bright.transpose(-1, -2).contiguous()
    out = _unnormalise(TrainAugment(32)(left_bright, torch.Generator().manual_seed(3)))[:, 0]
    left_wins = out[:, :, :12].mean(dim=(1, 2)) > out[:, :, -12:].mean(dim=(1, 2))
    assert 0 < int(left_wins.sum()) < 64  # some images were mirrored, some not


def test_eval_transform_matches_the_pil_path_transform():
    images = _batch(size=37, count=4)
    ours = EvalTransform(32, 33)(images)
    reference = build_transforms(32, False, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=33)
    theirs = torch.stack([reference(image.expand(3, -1, -1)) for image in images])
    assert ours.shape == theirs.shape == (4, 3, 32, 32)
    assert (ours - theirs).abs().max() < 1.5 / 255 / min(IMAGENET_STD)  # torchvision rounds to uint8 after resizing


def test_device_loader_covers_every_sample_in_a_seeded_order():
    dataset = DeviceDataset(torch.arange(10).view(10, 1).float(), torch.arange(10))
    batches = list(DeviceLoader(dataset, 4, True, CPU, seed=5))
    assert [len(labels) for _, labels in batches] == [4, 4, 2]
    order = torch.cat([labels for _, labels in batches])
    assert sorted(order.tolist()) == list(range(10))
    assert all(torch.equal(inputs[:, 0].long(), labels) for inputs, labels in batches)
    again = torch.cat([labels for _, labels in DeviceLoader(dataset, 4, True, CPU, seed=5)])
    other = torch.cat([labels for _, labels in DeviceLoader(dataset, 4, True, CPU, seed=6)])
    assert torch.equal(order, again) and not torch.equal(order, other)
    unshuffled = torch.cat([labels for _, labels in DeviceLoader(dataset, 4, False, CPU)])
    assert unshuffled.tolist() == list(range(10))


def test_device_dataset_from_images_keeps_uint8_single_channel():
    images = np.zeros((3, 37, 37), dtype=np.uint8)
    dataset = DeviceDataset.from_images(images, [0, 1, 2], CPU, EvalTransform(32, 33))
    assert dataset.inputs.shape == (3, 1, 37, 37) and dataset.inputs.dtype == torch.uint8
    with pytest.raises(ValueError):
        DeviceDataset(dataset.inputs, dataset.labels[:2])


def test_both_augmentations_read_the_one_set_of_parameters():
    from cxr.config import AUGMENTATION
    from cxr.evaluate.uncertainty import TTAViews

    assert TrainAugment(32).augmentation is AUGMENTATION
    crop, flip, affine, brightness, contrast = build_transforms(32, train=True).transforms[1:6]
    a = AUGMENTATION
    assert (crop.scale, crop.ratio, flip.p) == (a.resized_crop.scale, a.resized_crop.ratio, a.horizontal_flip.probability)
    assert (affine.degrees, affine.translate) == ([-a.affine.degrees, a.affine.degrees],
                                                  (a.affine.translate, a.affine.translate))
    assert brightness.brightness == (1 - a.brightness.strength, 1 + a.brightness.strength)
    assert contrast.contrast == (1 - a.contrast.strength, 1 + a.contrast.strength)
    assert TTAViews(32, 36, IMAGENET_MEAN, IMAGENET_STD).shift == a.affine.translate
