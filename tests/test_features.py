"""Frozen backbones: features computed once give the head exactly what the full forward pass gives it."""

import dataclasses

import pytest
import torch

from cxr.augment import DeviceDataset, DeviceLoader
from cxr.config import get_experiment
from cxr.data import load_splits
from cxr.engine import fit
from cxr.features import extract_features
from cxr.models import build_model
from cxr.runtime import Runtime

CPU = Runtime.create("cpu", progress=False)


def test_cached_features_give_the_same_head_outputs():
    torch.manual_seed(0)
    model = build_model("resnet50", weights="none", freeze_backbone=True, image_size=32)
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


def _head_training(splits, tmp_path, feature_cache):
    experiment = get_experiment("resnet50_full", freeze_backbone=True, backbone_lr=0.0, augment=False, epochs=1,
                                batch_size=8, image_size=32, weights="none", feature_cache=feature_cache)
    return fit(experiment, splits, tmp_path / feature_cache, CPU, seed=3)


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
    experiment = get_experiment("resnet50_full", freeze_backbone=True, backbone_lr=0.0, epochs=1, batch_size=8,
                                image_size=32, weights="none")
    result = fit(experiment, small_splits, tmp_path, CPU, seed=3)
    pipeline = result.extra["pipeline"]
    assert experiment.augment and pipeline["feature_cache"] == "val" and pipeline["augment_on"] == "cpu"
    assert pipeline["cache"] is True and pipeline["data_on"] == "cpu"
    assert dataclasses.asdict(experiment)["feature_cache"] == "auto"
