"""The classifiers: what trains, frozen backbones in eval mode, and pretrained weights offline."""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from cxr.models.backbones import get_backbone
from cxr.config import EXPERIMENTS, get_experiment
from cxr.train.optim import build_optimizer
from cxr.models.classifier import (Classifier, WeightsError, build_model, count_parameters, default_weights, estimate_batchnorm_statistics,
                        needs_batchnorm_statistics)
from cxr.common.runtime import Runtime

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: build_model(experiment.arch, weights="none", trainable_blocks=experiment.trainable_blocks, image_size=32)
            for name, experiment in EXPERIMENTS.items()}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_trainable_parameter_counts(models, name):
    model = models[name]
    total, trainable = count_parameters(model)
    blocks = EXPERIMENTS[name].trainable_blocks
    spec = get_backbone(EXPERIMENTS[name].arch)
    if blocks == 0:
        assert trainable == spec.feature_dim * 4 + 4
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    elif blocks != "all" and spec.name == "vit_b_16":  # its last encoder blocks, its final LayerNorm and the head
        layers = [f"encoder.layers.encoder_layer_{i}." for i in range(12 - blocks, 12)]
        expected = {n for n, _ in model.named_parameters()
                    if n.startswith("head.") or n.startswith("backbone.encoder.ln.")
                    or any(n.startswith("backbone." + layer) for layer in layers)}
        assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
        assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected) < total
    else:
        assert blocks == "all" and trainable == total
        torchvision_total = sum(p.numel() for p in getattr(tvm, spec.builder)().parameters())
        imagenet_head = spec.feature_dim * 1000 + 1000
        assert total == torchvision_total - imagenet_head + (spec.feature_dim * 4 + 4)  # 1000 classes -> 4


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_optimizer_gets_exactly_the_trainable_parameters(models, name):
    model = models[name]
    experiment = get_experiment(name)
    optimizer = build_optimizer(model, experiment, Runtime.create(CPU))
    in_optimizer = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(in_optimizer) == len(set(in_optimizer))
    assert set(in_optimizer) == {id(p) for p in model.parameters() if p.requires_grad}
    assert optimizer.param_groups[0]["lr"] == experiment.lr
    if not experiment.freeze_backbone:
        assert optimizer.param_groups[1]["lr"] == experiment.backbone_lr


def _one_training_step(model: nn.Module, name: str) -> None:
    torch.manual_seed(0)
    model.train()
    optimizer = build_optimizer(model, get_experiment(name), Runtime.create(CPU))
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()


def _batchnorm_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


@pytest.mark.parametrize("name", ["resnet152_head", "resnet50_full"])
def test_frozen_backbone_stays_in_eval_mode_during_training(name):
    experiment = get_experiment(name)
    model = build_model(experiment.arch, weights="none", trainable_blocks=experiment.trainable_blocks, image_size=32)
    frozen = experiment.freeze_backbone
    stats, backbone = _batchnorm_stats(model), {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    _one_training_step(model, name)
    assert model.training and model.head.training
    assert all(not m.training for m in model.backbone.modules()) == frozen
    after = _batchnorm_stats(model)
    assert all(torch.equal(stats[k], after[k]) for k in stats) == frozen  # fully trained: BatchNorm stats move
    if frozen:
        backbone_after = model.backbone.state_dict()
        assert all(torch.equal(v, backbone_after[k]) for k, v in backbone.items())
        assert all(p.grad is None for p in model.backbone.parameters())
    head_after = model.head.state_dict()
    assert not any(torch.equal(v, head_after[k]) for k, v in head.items())


def test_partially_trained_vit_keeps_its_frozen_blocks_in_eval_mode_and_unchanged():
    torch.manual_seed(0)
    model = build_model("vit_b_16", weights="none", trainable_blocks=2, image_size=32)
    layers = model.backbone.encoder.layers
    trained = ("encoder.layers.encoder_layer_10.", "encoder.layers.encoder_layer_11.", "encoder.ln.")
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items() if not k.startswith(trained)}
    model.train()
    blocks = list(layers)
    trained_modules = [m for block in blocks[-2:] for m in block.modules()] + [model.backbone.encoder.ln]
    assert all(m.training for m in trained_modules) and model.head.training
    frozen_modules = [m for block in blocks[:-2] for m in block.modules()]
    assert not any(m.training for m in [*frozen_modules, model.backbone.conv_proj, model.backbone.encoder.dropout])
    experiment = get_experiment("vit_b16_head", trainable_blocks=2, backbone_lr=1e-4)
    optimizer = build_optimizer(model, experiment, Runtime.create(CPU))
    assert optimizer.param_groups[1]["lr"] == 1e-4
    nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert all(p.grad is not None for p in layers[-1].parameters())
    assert all(p.grad is None for p in layers[0].parameters())


def test_trainable_blocks_count_residual_blocks_from_the_end():
    model = build_model("resnet50", weights="none", trainable_blocks=3, image_size=32)  # layer4 has 3 blocks
    trainable = {n.split(".")[1] if n.startswith("backbone.") else n for n, p in model.named_parameters()
                 if p.requires_grad}
    assert trainable == {"layer4", "head.weight", "head.bias"}
    model.train()
    assert all(m.training for block in model.backbone.layer4 for m in block.modules())
    assert not any(m.training for m in [*model.backbone.layer3.modules(), model.backbone.bn1])
    assert needs_batchnorm_statistics(model, "none")  # its frozen BatchNorm layers hold initial statistics
    for wrong in (-1, 17, "some", True):
        with pytest.raises(ValueError, match="trainable_blocks"):
            Classifier(model.backbone, model.head, "resnet50", wrong)


def test_a_bool_is_not_a_number_of_trainable_blocks():
    """The old ``freeze_backbone`` flag lives on only in stored configurations (``upgrade_experiment_dict``)."""
    for flag in (True, False):
        with pytest.raises(ValueError, match=f"trainable_blocks must be a whole number >= 0 or 'all', not {flag}"):
            build_model("resnet50", weights="none", trainable_blocks=flag, image_size=32)
    assert build_model("resnet50", weights="none", image_size=32).trainable_blocks == "all"


def test_vit_backbone_in_eval_mode_and_image_size(models):
    vit = models["vit_b16_head"]
    vit.train()
    assert vit.head.training and not any(m.training for m in vit.backbone.modules())
    assert vit.backbone.image_size == 32
    with torch.no_grad():
        assert vit.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert build_model("vit_b_16", weights="none", trainable_blocks=0).backbone.image_size == 224


# --- pretrained weights, offline -------------------------------------------------------------------------


def random_state_dict(arch: str = "resnet50") -> dict[str, torch.Tensor]:
    """A torchvision state dict whose every tensor (BatchNorm buffers too) differs from a fresh model's."""
    generator = torch.Generator().manual_seed(123)
    return {
        k: (torch.randn(v.shape, generator=generator) if v.is_floating_point() else v + 7)
        for k, v in getattr(tvm, arch)().state_dict().items()
    }


def assert_backbone_is(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.backbone.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


@pytest.fixture
def no_downloads(monkeypatch) -> list[str]:
    """torch.hub downloads fail as they would offline; the URLs asked for are recorded."""
    urls: list[str] = []

    def offline(url: str, *args, **kwargs) -> None:
        urls.append(url)
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return urls


@pytest.fixture(scope="module")
def resnet50_state(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path]:
    state = random_state_dict("resnet50")
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(state, path)
    return state, path


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch, no_downloads, resnet50_state):
    state, _ = resnet50_state
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / Path(default_weights("resnet50").url).name
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    assert Path(torch.hub.get_dir()) == tmp_path / "hub"
    model = build_model("resnet50", weights="imagenet", image_size=32)
    assert_backbone_is(model, state)
    assert no_downloads == []


def test_local_pth_file_is_loaded(resnet50_state):
    state, path = resnet50_state
    model = build_model("resnet50", weights=path)
    assert_backbone_is(model, state)
    assert isinstance(model.backbone.fc, nn.Identity) and model.head.out_features == 4


def test_weights_for_another_architecture_are_refused(resnet50_state, tmp_path):
    _, path = resnet50_state
    with pytest.raises(WeightsError, match="is not a ResNet152 backbone: its tensor 145 is .layer3.0.conv1.weight."):
        build_model("resnet152", weights=path, image_size=32)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(WeightsError, match="Could not read weights file .*: it is not a file written by torch.save"):
        build_model("resnet50", weights=garbage)


def test_missing_weights_offline_is_a_clear_error(tmp_path, monkeypatch, no_downloads):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as caught:
        build_model("resnet50", weights="imagenet")
    url = default_weights("resnet50").url
    assert no_downloads == [url]
    message = str(caught.value)
    assert url in message and str(tmp_path / "hub" / "checkpoints" / Path(url).name) in message
    assert "--weights PATH" in message and "--weights none" in message


def test_vit_imagenet_weights_need_224_pixels(no_downloads):
    with pytest.raises(WeightsError, match="--image-size 224"):
        build_model("vit_b_16", weights="imagenet", image_size=32)
    assert no_downloads == []


def test_only_a_frozen_random_backbone_with_batchnorm_needs_statistics(models):
    assert needs_batchnorm_statistics(models["resnet152_head"], "none")
    assert not needs_batchnorm_statistics(models["resnet152_head"], "imagenet")
    assert not needs_batchnorm_statistics(models["resnet152_head"], "/weights/resnet152.pth")
    assert not needs_batchnorm_statistics(models["resnet50_full"], "none")  # its BatchNorm trains
    assert not needs_batchnorm_statistics(models["vit_b16_head"], "none")  # LayerNorm only


def test_estimated_batchnorm_statistics_tame_a_frozen_random_backbone():
    torch.manual_seed(0)
    model = build_model("resnet152", weights="none", trainable_blocks=0, image_size=32)
    model.train()
    images = torch.rand(16, 3, 32, 32)
    weights_before = {name: p.clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        raw = model.backbone(images).abs().mean()
    estimate_batchnorm_statistics(model.backbone, [(images[:8], None), (images[8:], None)], CPU)
    with torch.no_grad():
        tamed = model.backbone(images).abs().mean()
    assert raw > 1e3 and tamed < 10  # initial statistics (0, 1) normalise nothing across 50 blocks
    assert not model.backbone.training
    assert all(torch.equal(p, weights_before[name]) for name, p in model.named_parameters())
    first = model.backbone.bn1
    assert torch.allclose(first.running_mean, first.running_mean.new_tensor(
        [model.backbone.conv1(images)[:, c].mean() for c in range(first.num_features)]), atol=1e-5)


def test_optimizer_and_schedule_are_chosen_by_name(models):
    import dataclasses

    from cxr.train.optim import build_schedule

    model, runtime = models["resnet50_full"], Runtime.create(CPU)
    sgd = dataclasses.replace(get_experiment("resnet50_full"), optimizer="sgd", schedule="warmup+constant",
                              epochs=3, warmup_epochs=1)
    optimizer = build_optimizer(model, sgd, runtime)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[1]["lr"] == sgd.backbone_lr
    schedule = build_schedule(optimizer, sgd, steps_per_epoch=2)
    factors = []
    for _ in range(6):
        factors.append(optimizer.param_groups[0]["lr"] / sgd.lr)
        optimizer.step()
        schedule.step()
    assert factors == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]  # warm-up over one epoch of two steps, then constant
    assert isinstance(build_optimizer(model, get_experiment("resnet50_full"), runtime), torch.optim.AdamW)
    for field, value, message in (("optimizer", "lion", "unknown optimizer 'lion'; choose one of: adamw, sgd"),
                                  ("schedule", "step", "unknown schedule 'step'; choose one of: warmup+cosine")):
        wrong = dataclasses.replace(sgd, **{field: value})
        with pytest.raises(ValueError, match=re.escape(message)):
            build_schedule(build_optimizer(model, wrong, runtime), wrong, 2)


def test_the_seeds_next_steps_are_one_configuration_entry_each():
    """vit_b16_partial: ViT-B/16's last 4 encoder blocks, final norm and head; resnet50_focal: resnet50_full
    with focal loss (gamma 2, class weights as alpha) and nothing else changed."""
    partial = get_experiment("vit_b16_partial")
    assert (partial.arch, partial.trainable_blocks, partial.loss) == ("vit_b_16", 4, "weighted_ce")
    model = build_model(partial.arch, weights="none", trainable_blocks=partial.trainable_blocks, image_size=32)
    trained = {n.split(".")[3] if ".layers." in n else n.split(".")[0] + "." + n.split(".")[1]
               for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"encoder_layer_{i}" for i in range(8, 12)} | {"backbone.encoder", "head.weight", "head.bias"}
    focal, full = get_experiment("resnet50_focal").to_dict(), get_experiment("resnet50_full").to_dict()
    assert {k for k in focal if focal[k] != full[k]} == {"name", "summary", "loss"}
    assert (focal["loss"], focal["focal_gamma"]) == ("focal", 2.0)
