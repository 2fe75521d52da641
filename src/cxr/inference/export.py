"""Hand a trained model on without this package's checkpoints: ONNX, safetensors and a JSON description.

``cxr export`` writes ``model.onnx`` (any runtime), ``model.safetensors`` (the weights only, no pickle, no
optimiser) and ``model.json`` (classes, how to prepare an image, the experiment and the run's metrics). The
folder is written under a temporary name and renamed at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from cxr.config import experiment_from_dict, upgrade_experiment_dict
from cxr.report.model_card import CARD_FILE
from cxr.models.backbones import BACKBONES
from cxr.models.classifier import Classifier, build_model
from cxr.inference.input_recipe import input_steps
from cxr.models.classifier import preprocessing as default_preprocessing
from cxr.data.preprocessing import FIELDS, Preprocessing
from cxr.models.checkpoint import non_finite_tensor
from cxr.inference.trained_model import check_finite_outputs, load_trained_model, state_dict_mismatch
from cxr.inference import export_identity
from cxr.data.provenance import git_commit
from cxr.report.run_record import RunRecord, RunRecordError, read_run_record

FORMAT = "cxr-export/1"
FILES = {"onnx": "model.onnx", "weights": "model.safetensors", "description": "model.json"}
# LayerNormalization, which ViT-B/16 needs as one node, is in the standard ONNX domain from opset 17.
ONNX_OPSET = 17
# A broken export (a layer in the wrong mode, an operator with other semantics) is off by far more; float32
# rounding alone, in a badly conditioned network (a random-weight ResNet152), reaches about 1e-3.
ONNX_TOLERANCE = 1e-3


class ExportError(RuntimeError):
    """An export cannot be written or an exported folder cannot be read; the message says why."""


class _WithProbabilities(nn.Module):
    """The classifier with a softmax output beside its logits, so a runtime needs no post-processing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)
        return logits, logits.softmax(1)


def input_description(prep: dict[str, Any]) -> str:
    """How to turn an image file into the network's input, in words (also stored in the ONNX file)."""
    size = prep["image_size"]
    return (f"N x 3 x {size} x {size} float32, from the image as in model.json's preprocessing.steps: 8-bit "
            f"grayscale (JPEG in libjpeg's draft mode), its centre square resized to "
            f"{input_steps(prep)['square_side']} px (bilinear), divided by 255, resized to {prep['resize']} px "
            f"(bilinear, antialiased), centre-cropped to {size} x {size}, repeated on 3 channels, then per "
            f"channel minus mean {prep['mean']} and divided by std {prep['std']}.")


def _run_metrics(checkpoint: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's validation scores and, when the run's metrics.json (``<run>/metrics.json`` beside
    ``<run>/checkpoints/``) describes this very checkpoint, its test metrics and commit."""
    history = state.get("history") or []
    row = history[state["epoch"] - 1] if len(history) >= state["epoch"] else {}
    validation = {k: v for k, v in row.items() if k.startswith("val_")}
    found: dict[str, Any] = {"epoch": state["epoch"], "validation": validation, "test": None, "commit": None}
    path = checkpoint.resolve().parent.parent / "metrics.json"
    try:
        record = read_run_record(path)
    except RunRecordError:
        return found
    if isinstance(record, RunRecord) and record.config == state["experiment"] and record.best_epoch == state["epoch"]:
        found.update(test=record.test.to_dict(), commit=record.git_commit, date=record.date,
                     dataset=record.dataset.name if record.dataset else None)
    return found


def _describe(state: dict[str, Any], prep: dict[str, Any], checkpoint: Path, check: float) -> dict[str, Any]:
    config = state["experiment"]
    return {
        "format": FORMAT,
        "classes": list(state["classes"]),
        "arch": config["arch"],
        "image_size": config["image_size"],
        "trainable_blocks": experiment_from_dict(config).trainable_blocks,
        "preprocessing": {**prep, **input_steps(prep), "channels": "grayscale repeated on the 3 channels",
                          "layout": "N x 3 x H x W float32", "description": input_description(prep)},
        "onnx": {"file": FILES["onnx"], "opset": ONNX_OPSET, "input": "image",
                 "outputs": {"logits": "N x classes", "probabilities": "N x classes, softmax of the logits"},
                 "max_probability_difference_to_pytorch": check},
        "weights": {"file": FILES["weights"], "contents": "state dict of cxr.models.classifier.Classifier (backbone.*, head.*)"},
        "experiment": config,
        "metrics": _run_metrics(checkpoint, state),
        "exported": {"from": checkpoint.name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "cxr_commit": git_commit(), "torch": torch.__version__},
    }


@contextlib.contextmanager
def _stdout_to_devnull() -> Iterator[None]:
    """Silence file descriptor 1: on a failure torch's exporter prints its whole graph there from C++
    (its log switch is read as always on), burying the one-line error."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def write_onnx(model: Classifier, path: Path, prep: dict[str, Any], classes: list[str], identity: str | None = None,
               ) -> float:
    """Trace ``model`` into ONNX with a dynamic batch, check it with onnxruntime against PyTorch on two
    random inputs and return the largest probability difference. torch's TorchScript exporter is used:
    it needs no extra package (the dynamo exporter needs onnxscript) and, with the same results, exported
    ResNet50 and ViT-B/16 at 32 px 3-4.5x faster on this project's 2-core CPU. ``identity`` (see
    :mod:`cxr.inference.export_identity`) goes into the metadata beside the classes."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ExportError(f"ONNX export needs the export extra ({error}): pip install 'cxr[export]' "
                          "(with uv: uv sync --extra export).") from None

    size = prep["image_size"]
    wrapped = _WithProbabilities(model).eval()  # the exporter restores this mode afterwards
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    traced = io.BytesIO()  # in memory: the file is written once, with its descriptions
    fast_path = torch.backends.mha.get_fastpath_enabled()
    try:
        # A frozen ViT would trace into the fused attention kernel, which ONNX has no operator for.
        torch.backends.mha.set_fastpath_enabled(False)
        with warnings.catch_warnings(), _stdout_to_devnull():  # tracer notes on ViT's shape asserts, deprecation
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (example,), traced, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["image"], output_names=["logits", "probabilities"],
                              dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}, "probabilities": {0: "N"}})
    except Exception as error:  # the exporter raises many kinds (unsupported operator, tracing, shape) errors
        detail = (str(error).strip().splitlines() or ["no detail"])[0]
        raise ExportError(f"The ONNX exporter could not trace the {model.arch} model ({type(error).__name__}: "
                          f"{detail}).") from None
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    graph = onnx.load_model_from_string(traced.getvalue())
    graph.graph.input[0].doc_string = input_description(prep)
    onnx.helper.set_model_props(graph, {"classes": json.dumps(classes), "preprocessing": json.dumps(prep),
                                        **({export_identity.METADATA_KEY: identity} if identity else {})})
    onnx.save(graph, str(path))
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = wrapped(example)[1].numpy()
    difference = float(np.abs(session.run(["probabilities"], {"image": example.numpy()})[0] - expected).max())
    if not difference <= ONNX_TOLERANCE:
        raise ExportError(f"The ONNX model's probabilities differ from PyTorch's by {difference:.2g} "
                          f"(more than {ONNX_TOLERANCE}); not exported.")
    return difference


def write_weights(model: nn.Module, path: Path, arch: str) -> None:
    """The model's tensors only (no optimiser, no pickle), readable by any safetensors library."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "arch": arch})


def _check_destination(out: Path, force: bool) -> None:
    """``out`` may be replaced only when it is new, empty, or holds nothing but what an earlier export wrote
    (the files model.json lists under ``written``): a user's notes or data beside an export are never deleted."""
    if not out.exists():
        return
    if not force:
        raise ExportError(f"{str(out)!r} already exists; pass --force to replace it.")
    if out.is_dir() and not any(out.iterdir()):
        return
    try:
        description = json.loads((out / FILES["description"]).read_text())
    except (OSError, ValueError):
        description = None
    if not (out.is_dir() and isinstance(description, dict) and description.get("format") == FORMAT):
        raise ExportError(f"{str(out)!r} exists and is not an export folder (no {FILES['description']} written by "
                          "cxr export); not replacing it, even with --force.")
    written = description.get("written")  # exports before issue 31 did not list their files: what they wrote
    written = set(written) if isinstance(written, list) else {*FILES.values(), CARD_FILE}
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                     if p.name not in written or p.is_dir() or p.is_symlink())
    if foreign:
        raise ExportError(f"{str(out)!r} holds files cxr export did not write ({', '.join(foreign[:5])}"
                          f"{f' and {len(foreign) - 5} more' if len(foreign) > 5 else ''}); not replacing it, even "
                          "with --force: move them elsewhere or choose another --out.")


def export_model(checkpoint: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> dict[str, Any]:
    """Write ``model.onnx``, ``model.safetensors`` and ``model.json`` for ``checkpoint`` into the folder
    ``out``, which must not exist (``force``: an earlier export there is replaced). Returns model.json."""
    checkpoint, out = Path(checkpoint), Path(out)
    model, state = load_trained_model(checkpoint)
    config = state["experiment"]
    prep = state.get("preprocessing") or default_preprocessing(config["arch"], config["image_size"])
    _check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    try:
        temporary.mkdir()
        weights_sha256 = export_identity.weights_digest(model.state_dict())
        identity = export_identity.export_identity(weights_sha256, list(state["classes"]))
        check = write_onnx(model, temporary / FILES["onnx"], prep, list(state["classes"]), identity)
        write_weights(model, temporary / FILES["weights"], config["arch"])
        description = _describe(state, prep, checkpoint, check)
        description[export_identity.FIELD] = {"sha256": identity, "weights_sha256": weights_sha256,
                                              "onnx_weights_sha256": _onnx_weights_sha256(temporary / FILES["onnx"])}
        card = checkpoint.resolve().parent.parent / CARD_FILE  # written beside the run's metrics.json
        description["model_card"] = CARD_FILE if card.is_file() else None
        if card.is_file():
            shutil.copy2(card, temporary / CARD_FILE)
        description["written"] = sorted([*FILES.values(), *([CARD_FILE] if card.is_file() else [])])
        (temporary / FILES["description"]).write_text(json.dumps(description, indent=2, default=str) + "\n")
        if out.exists():
            out.rename(old)
        temporary.rename(out)
    except OSError as error:
        raise ExportError(f"Could not write the export to {str(out)!r} ({error}); nothing was written.") from None
    finally:  # also on Ctrl-C: no partial folder stays behind, an earlier export is put back
        if old.exists() and not out.exists():
            old.rename(out)
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return description


def _onnx_weights_sha256(path: Path) -> str:
    import onnx

    return export_identity.onnx_weights_digest(onnx.load(str(path)))


def read_description(folder: Path) -> dict[str, Any]:
    """model.json of an exported folder, checked enough to rebuild the model from it."""
    path = folder / FILES["description"]
    try:
        description = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{str(folder)!r} is not an export folder: it has no {FILES['description']}.") from None
    except (OSError, ValueError) as error:
        raise ExportError(f"Could not read {str(path)!r} ({error}).") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise ExportError(f"{str(path)!r} is not a cxr export description (format {FORMAT!r} expected).")
    if description.get("arch") not in BACKBONES:
        raise ExportError(f"{str(path)!r} names an unknown architecture {description.get('arch')!r}.")
    _check_fields(description, path)
    problem = export_identity.recorded_identity(description)
    if problem is not None:
        raise ExportError(f"{str(path)!r} {problem}; re-export the checkpoint with cxr export.")
    _check_against_onnx(description, folder / FILES["onnx"], path)
    return description


def _refuse_field(path: Path, field: str, problem: str) -> ExportError:
    return ExportError(f"{str(path)!r}: field {field!r} {problem}; re-export the checkpoint with cxr export.")


def _check_fields(description: dict[str, Any], path: Path) -> None:
    """The fields predicting reads, of the types it reads them as: an edited or truncated model.json is
    named here, not deep inside PyTorch ("too many dimensions 'str'")."""
    classes = description.get("classes")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)
            and len(set(classes)) == len(classes)):
        raise _refuse_field(path, "classes", f"must be a list of two or more distinct class names, not {classes!r}")
    prep = description.get("preprocessing")
    if not isinstance(prep, dict):
        raise _refuse_field(path, "preprocessing", "is missing" if prep is None else f"must be an object, not {prep!r}")
    for key in ("image_size", "resize"):
        if not (isinstance(prep.get(key), int) and prep[key] >= 1):
            raise _refuse_field(path, f"preprocessing.{key}", f"must be a whole number of pixels, not {prep.get(key)!r}")
    for key in ("mean", "std"):
        values = prep.get(key)
        if not (isinstance(values, list) and len(values) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                and (key == "mean" or all(v > 0 for v in values))):
            raise _refuse_field(path, f"preprocessing.{key}", f"must be three numbers (R, G, B), not {values!r}")
    if description.get("image_size") != prep["image_size"]:
        raise _refuse_field(path, "image_size", f"({description.get('image_size')!r}) differs from "
                                                f"preprocessing.image_size ({prep['image_size']!r})")
    blocks = upgrade_experiment_dict(description).get("trainable_blocks")  # older exports: freeze_backbone
    if not (blocks == "all" or (isinstance(blocks, int) and not isinstance(blocks, bool) and blocks >= 0)):
        raise _refuse_field(path, "trainable_blocks", f"must be a whole number >= 0 or \"all\", not {blocks!r}")


def _check_against_onnx(description: dict[str, Any], onnx_path: Path, path: Path) -> None:
    """model.json against what model.onnx itself holds (its metadata and its input and output shapes):
    reordered or renamed classes would relabel every prediction, another image size would feed the
    network inputs it was not trained on."""
    import onnx

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False)
    except FileNotFoundError:
        raise ExportError(f"{str(onnx_path.parent)!r} is not a complete export: it has no {FILES['onnx']}.") from None
    except Exception as error:  # protobuf raises its own DecodeError for a damaged file
        raise ExportError(f"Could not read {str(onnx_path)!r} ({type(error).__name__}: {error}).") from None
    metadata = {prop.key: prop.value for prop in graph.metadata_props}
    try:
        saved_classes, saved_prep = json.loads(metadata["classes"]), json.loads(metadata["preprocessing"])
    except (KeyError, ValueError):
        raise ExportError(f"{str(onnx_path)!r} holds no class list or preprocessing in its metadata; "
                          "re-export the checkpoint with cxr export.") from None
    image_dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    logit_dims = [d.dim_value for d in graph.graph.output[0].type.tensor_type.shape.dim]
    prep = description["preprocessing"]
    expected = [("classes", description["classes"], saved_classes),
                ("image_size", description["image_size"], image_dims[2] if len(image_dims) == 4 else None),
                ("classes (count)", len(description["classes"]), logit_dims[1] if len(logit_dims) == 2 else None),
                *((f"preprocessing.{k}", prep[k], saved_prep.get(k)) for k in FIELDS)]
    for field, found, truth in expected:
        if found != truth:
            raise _refuse_field(path, field, f"is {found!r}, but {FILES['onnx']} says {truth!r}")
    problem = export_identity.onnx_mismatch(description, graph)
    if problem is not None:
        raise ExportError(f"{str(onnx_path.parent)!r} mixes files of different exports: {problem}; re-export the "
                          "checkpoint with cxr export.")


def load_export(folder: str | os.PathLike) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the PyTorch model from ``model.safetensors`` + ``model.json`` (no pickle is read)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    description = read_description(folder)
    trainable_blocks = upgrade_experiment_dict(description)["trainable_blocks"]  # checked by read_description
    model = build_model(description["arch"], len(description["classes"]), "none", trainable_blocks,
                        description["image_size"])
    weights = folder / FILES["weights"]
    try:
        tensors = load_file(str(weights))
        model.load_state_dict(tensors)
    except (OSError, SafetensorError) as error:
        detail = (str(error).strip().splitlines() or ["no detail"])[0]
        raise ExportError(f"Could not load {str(weights)!r} into a {description['arch']} model ({detail}).") from None
    except RuntimeError as error:
        raise ExportError(f"Could not load {str(weights)!r} into a {description['arch']} model with "
                          f"{len(description['classes'])} classes ({state_dict_mismatch(error)}).") from None
    bad = non_finite_tensor(tensors)
    if bad is not None:
        raise ExportError(f"{str(weights)!r} holds non-finite weights (NaN or infinity in {bad!r}); "
                          "it cannot predict anything.")
    problem = export_identity.weights_mismatch(description, tensors)
    if problem is not None:
        raise ExportError(f"{str(folder)!r} mixes files of different exports: {problem}; re-export the "
                          "checkpoint with cxr export.")
    check_finite_outputs(model, description["image_size"], folder)
    return model.eval(), description


def load_for_inference(path: str | os.PathLike) -> tuple[Classifier, list[str], dict[str, Any]]:
    """(model, classes, preprocessing) from a checkpoint written by ``cxr train`` or a folder written by
    ``cxr export``: what predicting needs, whichever of the two a user has."""
    path = Path(path)
    if path.is_dir():
        model, description = load_export(path)
        prep = Preprocessing.from_dict(description["preprocessing"]).as_dict()
        return model, list(description["classes"]), prep
    model, state = load_trained_model(path)
    config = experiment_from_dict(state["experiment"])
    prep = state.get("preprocessing") or default_preprocessing(config.arch, config.image_size)
    return model, list(state["classes"]), prep
