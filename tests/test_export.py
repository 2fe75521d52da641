"""cxr export: ONNX and safetensors files that reproduce the PyTorch model, model.json that describes them,
predict from an exported folder, and clear refusals that leave nothing half-written."""

import json
import shutil
import sys

import numpy as np
import onnx
import onnxruntime
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cxr.inference import export
from cxr.models.checkpoint import save_checkpoint
from cxr.cli import main
from cxr.config import EXPERIMENTS, get_experiment
from cxr.data.dataset import build_transforms, load_image, load_splits
from cxr.data.layout import CLASSES
from cxr.inference.export import export_model, load_export, load_for_inference
from cxr.report.model_card import write_model_card
from cxr.models.classifier import Classifier, build_model, estimate_batchnorm_statistics, preprocessing
from cxr.inference.predict import run_predict

SIZE = 32


def write_run(folder, name: str):
    """``<run>/checkpoints/best.pt`` and ``<run>/metrics.json`` as ``cxr train`` leaves them.

    Random weights, made as well-conditioned as trained ones: BatchNorm statistics from random images (else
    activations reach 1e6), and each residual branch's last BatchNorm scale halved. A plain random ResNet152
    is chaotic: float32 rounding alone moves its probabilities by ~1e-3 (PyTorch fp32 against fp64), which
    would hide what the 1e-4 comparisons below check."""
    torch.manual_seed(0)
    experiment = get_experiment(name, epochs=1, batch_size=8, image_size=SIZE, weights="none")
    model = build_model(experiment.arch, weights="none", trainable_blocks=experiment.trainable_blocks, image_size=SIZE)
    estimate_batchnorm_statistics(model.backbone, [torch.randn(8, 3, SIZE, SIZE)], torch.device("cpu"))
    with torch.no_grad():
        for module_name, module in model.backbone.named_modules():
            if module_name.endswith(".bn3"):
                module.weight.mul_(0.5)
    head = nn.Linear(model.head.in_features, len(CLASSES))
    history = [{"epoch": 1, "val_loss": 1.3, "val_accuracy": 0.4, "val_macro_f1": 0.35}]
    checkpoint = save_checkpoint({"model": model.state_dict(), "optimizer": torch.optim.AdamW(head.parameters()).state_dict(),
                                  "experiment": experiment.to_dict(), "classes": list(CLASSES), "epoch": 1,
                                  "history": history, "preprocessing": preprocessing(experiment.arch, SIZE), "seed": 42},
                                 folder / "checkpoints" / "best.pt")
    metrics = {"config": experiment.to_dict(), "best_epoch": 1, "git_commit": "0123456789ab",
               "test": {"accuracy": 0.5, "macro_f1": 0.4}, "dataset": {"name": "synthetic"}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    write_model_card(folder)
    return checkpoint


@pytest.fixture(scope="module")
def images(synthetic_root):
    """Four real test images of the synthetic dataset (one per class)."""
    with pytest.warns(UserWarning, match="Skipped"):
        test = load_splits(synthetic_root).test
    return [test.paths[test.labels.index(k)] for k in range(len(CLASSES))]


@pytest.fixture(scope="module", params=sorted(EXPERIMENTS))
def exported(request, tmp_path_factory):
    """One run per experiment exported through the CLI; the large files are removed afterwards."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    checkpoint = write_run(root / "run", request.param)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(root / "export")]) == 0
    yield request.param, checkpoint, root / "export"
    shutil.rmtree(root)


def inputs_of(images, prep) -> torch.Tensor:
    transform = build_transforms(prep["image_size"], False, mean=prep["mean"], std=prep["std"], resize=prep["resize"])
    return torch.stack([transform(load_image(path)) for path in images])


def test_onnx_and_safetensors_reproduce_the_pytorch_model(exported, images):
    name, checkpoint, folder = exported
    model, classes, prep = load_for_inference(checkpoint)
    batch = inputs_of(images, prep)
    with torch.inference_mode():
        expected = model(batch).softmax(1).numpy()
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    for size in (1, len(images)):  # the batch dimension is dynamic
        logits, probabilities = session.run(None, {"image": batch[:size].numpy()})
        assert logits.shape == probabilities.shape == (size, len(CLASSES))
        np.testing.assert_allclose(probabilities, expected[:size], rtol=0, atol=1e-4)
    rebuilt, description = load_export(folder)
    with torch.inference_mode():
        np.testing.assert_allclose(rebuilt(batch).softmax(1).numpy(), expected, rtol=0, atol=1e-6)
    weights = load_file(str(folder / "model.safetensors"))
    assert set(weights) == set(model.state_dict()) and not any("optim" in key for key in weights)
    assert description["arch"] == EXPERIMENTS[name].arch and description["classes"] == classes == list(CLASSES)
    assert description["trainable_blocks"] == EXPERIMENTS[name].trainable_blocks == rebuilt.trainable_blocks


@pytest.mark.parametrize("exported", ["resnet50_full"], indirect=True)
def test_an_export_from_before_trainable_blocks_still_loads(exported, tmp_path):
    _, _, folder = exported
    old = tmp_path / "old-export"
    shutil.copytree(folder, old)
    description = json.loads((old / "model.json").read_text())
    description["freeze_backbone"] = False
    del description["trainable_blocks"]
    (old / "model.json").write_text(json.dumps(description))
    model, _ = load_export(old)
    assert model.trainable_blocks == "all"


def test_model_json_says_how_to_use_the_onnx_file_without_this_package(exported):
    name, _, folder = exported
    description = json.loads((folder / "model.json").read_text())
    prep = description["preprocessing"]
    assert {k: prep[k] for k in ("image_size", "resize", "mean", "std")} == preprocessing(EXPERIMENTS[name].arch, SIZE)
    assert prep["layout"] == "N x 3 x H x W float32" and "grayscale" in prep["channels"]
    assert description["onnx"]["max_probability_difference_to_pytorch"] <= 1e-4
    assert description["experiment"] == get_experiment(name, epochs=1, batch_size=8, image_size=SIZE,
                                                       weights="none").to_dict()
    assert description["metrics"]["validation"] == {"val_loss": 1.3, "val_accuracy": 0.4, "val_macro_f1": 0.35}
    assert description["metrics"]["test"] == {"accuracy": 0.5, "macro_f1": 0.4}
    assert description["metrics"]["commit"] == "0123456789ab"
    graph = onnx.load(str(folder / "model.onnx"))
    assert graph.opset_import[0].version >= 17
    shape = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in shape] == ["N", 3, SIZE, SIZE]
    assert "centre-cropped" in graph.graph.input[0].doc_string
    assert json.loads({p.key: p.value for p in graph.metadata_props}["classes"]) == list(CLASSES)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["export", "run"]  # no temporary folder left


def test_the_run_model_card_goes_into_the_export(tmp_path):
    checkpoint = write_run(tmp_path / "run", "resnet50_full")
    description = export_model(checkpoint, tmp_path / "export")
    card = (tmp_path / "export" / "model_card.md").read_text()
    assert description["model_card"] == "model_card.md" and card == (tmp_path / "run" / "model_card.md").read_text()
    assert "Not for diagnosis" in card
    (tmp_path / "run" / "model_card.md").unlink()
    assert export_model(checkpoint, tmp_path / "export", force=True)["model_card"] is None
    assert not (tmp_path / "export" / "model_card.md").exists()


def test_model_json_leaves_out_metrics_of_another_run(tmp_path):
    checkpoint = write_run(tmp_path / "run", "resnet50_full")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({**metrics, "best_epoch": 3}))
    description = export_model(checkpoint, tmp_path / "export")
    assert description["metrics"]["test"] is None and description["metrics"]["commit"] is None


@pytest.mark.parametrize("exported", ["resnet50_full"], indirect=True)  # one architecture is enough here
def test_predict_accepts_an_exported_folder(exported, images, tmp_path, capsys):
    _, checkpoint, folder = exported
    from_checkpoint = run_predict(checkpoint, images, device="cpu", progress=False).table
    from_folder = run_predict(folder, images, device="cpu", progress=False).table
    pd.testing.assert_frame_equal(from_folder, from_checkpoint, atol=1e-6)
    assert main(["predict", "--checkpoint", str(folder), *map(str, images), "--csv", str(tmp_path / "p.csv"),
                 "--device", "cpu", "--quiet"]) == 0
    assert f"{len(images)} image(s) classified" in capsys.readouterr().out


@pytest.mark.parametrize("exported", ["resnet50_full"], indirect=True)
def test_refuses_an_existing_folder_unless_forced(exported, tmp_path, capsys):
    _, checkpoint, folder = exported
    before = (folder / "model.json").read_text()
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(folder)]) == 1
    assert capsys.readouterr().err == f"error: {str(folder)!r} already exists; pass --force to replace it.\n"
    assert (folder / "model.json").read_text() == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(other), "--force"]) == 1
    assert "is not an export folder" in capsys.readouterr().err and (other / "keep.txt").read_text() == "mine"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(folder), "--force"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx", "model.safetensors", "model_card.md"]
    assert load_export(folder)[1]["classes"] == list(CLASSES)


@pytest.mark.parametrize("content", [b"not a checkpoint", "state dict"])
def test_refuses_a_checkpoint_that_is_not_ours(content, tmp_path, capsys):
    path = tmp_path / "model.pt"
    if content == "state dict":
        torch.save(nn.Linear(2, 2).state_dict(), path)
    else:
        path.write_bytes(content)
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "export")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a cxr checkpoint" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


class SingularValues(nn.Module):
    """A backbone built on an operator that ONNX has no equivalent for."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(images.flatten(2)).flatten(1)


def export_with_backbone(tmp_path, monkeypatch, backbone: nn.Module, arch: str) -> int:
    """``cxr export`` of a real checkpoint whose model is swapped for ``backbone`` + a 3-feature head."""
    checkpoint = write_run(tmp_path / "run", "resnet50_full")
    model = Classifier(backbone, nn.Linear(3, len(CLASSES)), arch, trainable_blocks="all")
    real = export.load_trained_model
    monkeypatch.setattr(export, "load_trained_model", lambda path: (model, real(path)[1]))
    return main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")])


def test_refuses_a_model_the_exporter_cannot_trace(tmp_path, monkeypatch, capfd):
    assert export_with_backbone(tmp_path, monkeypatch, SingularValues(), "svd_net") == 1
    out, err = capfd.readouterr()
    assert err == ("error: The ONNX exporter could not trace the svd_net model (UnsupportedOperatorError: Exporting "
                   "the operator 'aten::linalg_svdvals' to ONNX opset version 17 is not supported).\n")
    assert out == ""  # not the exporter's graph dump
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_predict_refuses_a_folder_that_is_not_an_export(tmp_path, images, capsys):
    (tmp_path / "model.json").write_text(json.dumps({"format": "something else"}))
    assert main(["predict", "--checkpoint", str(tmp_path), str(images[0]), "--quiet"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {str(tmp_path / 'model.json')!r} is not a cxr export")
    (tmp_path / "model.json").unlink()
    assert main(["predict", "--checkpoint", str(tmp_path), str(images[0]), "--quiet"]) == 1
    assert capsys.readouterr().err == f"error: {str(tmp_path)!r} is not an export folder: it has no model.json.\n"


class Drifting(nn.Module):
    """A backbone whose output changes after it was traced (as a model left in training mode would)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images.flatten(1)[:, :3] * 10 * (-1) ** self.calls


def test_refuses_an_onnx_file_that_does_not_match_pytorch(tmp_path, monkeypatch, capsys):
    assert export_with_backbone(tmp_path, monkeypatch, Drifting(), "drifting") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: The ONNX model's probabilities differ from PyTorch's by ")
    assert err.endswith("(more than 0.001); not exported.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_without_the_extra_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if `pip install cxr` without [export]
    with pytest.raises(export.ExportError, match=r"needs the export extra .*pip install 'cxr\[export\]'"):
        export.write_onnx(nn.Identity(), tmp_path / "model.onnx", {"image_size": 32}, list(CLASSES))
    assert not (tmp_path / "model.onnx").exists()
