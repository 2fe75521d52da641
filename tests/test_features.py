"""Frozen backbones: features computed once give the head exactly what the full forward pass gives it."""

import dataclasses

import pytest
import torch

from cxr.data.augment import DeviceDataset, DeviceLoader
from cxr.config import get_experiment
from cxr.data.dataset import load_splits
from cxr.train.engine import fit
from cxr.train.features import FrozenBackboneBatches, extract_features
from cxr.models.classifier import build_model
from cxr.common.runtime import Runtime

CPU = Runtime.create("cpu", progress=False)


def test_cached_features_give_the_same_head_outputs():
    torch.manual_seed(0)
    model = build_model("resnet50", weights="none", trainable_blocks=0, image_size=32)
    images, labels = torch.randn(10, 3, 32, 32), torch.arange(10) % 4
    features, feature_labels = extract_features(model.backbone, DeviceLoader(DeviceDataset(images, labels), 4, False, CPU),
                                                CPU)
    assert features.shape == (10, 2048) and torch.equal(feature_labels, labels)
    with torch.no_grad():
        for mode in (True, False):  # a frozen backbone runs in eval mode while the head trains
            model.train(mode)
            assert torch.allclose(model.head(features), model(images), atol=1e-5)
    assert model.backbone.training is False


@pytest.fixture(scope="module")
def small_splits(synthetic_root):
    with pytest.warns(UserWarning):
        return load_splits(synthetic_root)


def _head_training(splits, tmp_path, feature_cache, runtime=CPU, epochs=1):
    experiment = get_experiment("resnet50_full", trainable_blocks=0, backbone_lr=0.0, augment=False, epochs=epochs,
                                batch_size=8, image_size=32, weights="none")
    return fit(experiment, splits, tmp_path / f"{feature_cache}-{runtime.frozen_forward_batch}",
               runtime.replace(feature_cache=feature_cache == "auto"), seed=3)


def test_training_the_head_on_cached_features_matches_the_full_forward_pass(small_splits, tmp_path):
    cached = _head_training(small_splits, tmp_path, "auto")
    full = _head_training(small_splits, tmp_path, "off")
    assert cached.extra["pipeline"]["feature_cache"] == "train+val"
    assert full.extra["pipeline"]["feature_cache"] == "off"
    assert full.extra["pipeline"]["images_decoded"] == 0  # the first run filled the image cache
    for row_cached, row_full in zip(cached.history, full.history, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert row_cached[key] == pytest.approx(row_full[key], rel=1e-4, abs=1e-6), key
    for name, value in cached.model.head.state_dict().items():
        assert torch.allclose(value, full.model.head.state_dict()[name], atol=1e-5), name


def test_with_augmentation_only_validation_features_are_cached(small_splits, tmp_path):
    experiment = get_experiment("resnet50_full", trainable_blocks=0, backbone_lr=0.0, epochs=1, batch_size=8,
                                image_size=32, weights="none")
    result = fit(experiment, small_splits, tmp_path, CPU, seed=3)
    pipeline = result.extra["pipeline"]
    assert experiment.augment and pipeline["feature_cache"] == "val" and pipeline["augment_on"] == "cpu"
    assert pipeline["cache"] is True and pipeline["data_on"] == "cpu"
    assert "feature_cache" not in dataclasses.asdict(experiment)  # how a run executes is the Runtime's


def test_frozen_backbone_batches_are_the_step_loaders_batches_in_features():
    torch.manual_seed(0)
    backbone = build_model("resnet50", weights="none", trainable_blocks=0, image_size=32).backbone
    dataset = DeviceDataset(torch.randn(21, 3, 32, 32), torch.arange(21) % 4)
    batches = FrozenBackboneBatches(backbone, DeviceLoader(dataset, 12, True, CPU, seed=5), CPU, step_batch=4)
    steps = list(DeviceLoader(dataset, 4, True, CPU, seed=5))
    assert len(batches) == len(steps) == 6
    for (features, labels), (images, step_labels) in zip(batches, steps, strict=True):
        assert torch.equal(labels, step_labels) and not features.requires_grad
        with torch.no_grad():
            assert torch.allclose(features, backbone(images), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="multiple"):
        FrozenBackboneBatches(backbone, DeviceLoader(dataset, 10, True, CPU), CPU, step_batch=4)


def test_a_larger_frozen_forward_batch_trains_the_same_head(small_splits, tmp_path):
    """Two epochs, the head stepping every 8 images: the backbone run on 8 or on 32 images at once (what a
    GPU run does with 256) gives the same losses and the same head."""
    step = _head_training(small_splits, tmp_path, "off", CPU, epochs=2)
    large = _head_training(small_splits, tmp_path, "off", CPU.replace(frozen_forward_batch=32), epochs=2)
    assert step.extra["pipeline"]["frozen_forward_batch"] == 8 and large.extra["pipeline"]["frozen_forward_batch"] == 32
    for row_step, row_large in zip(step.history, large.history, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert row_step[key] == pytest.approx(row_large[key], rel=1e-4, abs=1e-6), key
    for name, value in step.model.head.state_dict().items():
        assert torch.allclose(value, large.model.head.state_dict()[name], atol=1e-5), name
