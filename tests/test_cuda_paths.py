"""Every code path a CUDA run takes, run here on the CPU with the choices a CUDA run makes.

CI has no GPU. A run on one differs from a CPU run only through its :class:`Runtime`: bf16 autocast,
channels_last, fused AdamW, non-blocking copies, the split held as one tensor and augmented on the device,
a frozen backbone's features cached. ``Runtime.cuda_like`` makes exactly those choices on the CPU, and each
experiment goes through all of it here: train (with and without augmentation), evaluate with test-time
augmentation, predict, Grad-CAM. At 0fd3cc0 the two frozen-backbone experiments crashed on every GPU at
their first validation pass (channels_last asked of rank-2 feature vectors) while every CPU test passed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr import workflow
from cxr.inference.trained_model import load_trained_model
from cxr.cli import main
from cxr.config import EXPERIMENTS
from cxr.data.dataset import load_splits
from cxr.data.layout import CLASSES
from cxr.inference.predict import predict_images
from cxr.train.run_options import RunOptions
from cxr.common.runtime import Runtime

# The synthetic set holds unusable files on purpose; the ``trained`` fixture asserts that training warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:Skipped .* unusable file")

TINY = {"epochs": 1, "batch_size": 8, "image_size": 32, "weights": "none"}
SEED = 3


@dataclass
class Trained:
    name: str
    augment: bool
    out_dir: Path
    metrics: dict
    runtime: Runtime


@pytest.fixture(scope="module", params=[(name, augment) for name in sorted(EXPERIMENTS) for augment in (True, False)],
                ids=lambda p: f"{p[0]}-{'augment' if p[1] else 'no-augment'}")
def trained(request, synthetic_root, tmp_path_factory, cuda_like) -> Trained:
    name, augment = request.param
    out = tmp_path_factory.mktemp(f"cuda-like-{name}")
    with pytest.warns(UserWarning, match="Skipped"):
        metrics = workflow.train_experiment(name, data_dir=synthetic_root, out=out, runtime=cuda_like,
                                            options=RunOptions(seed=SEED), augment=augment, **TINY)
    return Trained(name, augment, out / name, metrics, cuda_like)


def test_runtime_for_cuda_is_what_cuda_like_reproduces():
    """The CPU stand-in differs from a real CUDA runtime only where the CPU cannot follow (pinned memory,
    cuDNN) and in the device itself; a CPU runtime makes none of the CUDA choices."""
    cuda_like, cpu = Runtime.cuda_like("cpu"), Runtime.create("cpu")
    assert (cuda_like.amp_dtype, cuda_like.channels_last, cuda_like.fused_optimizer, cuda_like.hold_on_device) == (
        torch.bfloat16, True, True, True)
    assert (cpu.amp_dtype, cpu.channels_last, cpu.fused_optimizer, cpu.pin_memory, cpu.workers) == (
        None, False, False, False, 0)
    if torch.cuda.is_available():  # on a GPU machine: the real choices
        real = Runtime.create("cuda")
        differs = {k for k, v in vars(real).items() if vars(cuda_like)[k] != v}
        assert differs <= {"device", "amp_dtype", "pin_memory", "cudnn_benchmark", "cuda_graphs", "workers"}


def test_a_split_stays_on_the_gpu_only_under_a_quarter_of_its_free_memory(monkeypatch):
    """The rule :meth:`Runtime.holds_on_device` applies on a GPU, with its free memory stood in for."""
    from cxr.common import runtime as runtime_module

    gib = 2**30
    monkeypatch.setattr(runtime_module, "free_device_memory", lambda device: 8 * gib)
    gpu = Runtime(torch.device("cuda"), hold_on_device=True)
    assert gpu.holds_on_device(gib) and not gpu.holds_on_device(3 * gib)
    assert not gpu.replace(hold_on_device=False).holds_on_device(1)
    assert Runtime.create("cpu").holds_on_device(100 * gib)  # host memory is the CPU's own


def test_splits_can_be_kept_in_host_memory_on_purpose():
    """``cxr train --splits-in-host-memory``: the path of a split too large for the GPU, taken on demand (the GPU
    check runs it once); it reaches the runtime, which then holds no split on the device."""
    from cxr.cli import build_parser

    flags = build_parser().parse_args(["train", "resnet50_full", "--splits-in-host-memory"])
    assert flags.splits_on_device is False
    assert build_parser().parse_args(["train", "resnet50_full"]).splits_on_device is True
    assert Runtime.create("cpu", splits_on_device=False).hold_on_device is False
    assert Runtime.create("cpu").hold_on_device is False  # the CPU never needed it: its memory is the host's


def test_channels_last_only_for_image_batches():
    runtime = Runtime.cuda_like("cpu")
    images, features = runtime.to_device(torch.randn(2, 3, 8, 8)), runtime.to_device(torch.randn(2, 16))
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    assert features.shape == (2, 16) and features.is_contiguous()


def test_trains_with_the_cuda_choices(trained):
    pipeline = trained.metrics["pipeline"]
    assert trained.metrics["epochs_run"] == 1
    assert (pipeline["mixed_precision"], pipeline["channels_last"], pipeline["fused_optimizer"]) == ("bfloat16", True, True)
    assert pipeline["data_on"] == "cpu" and pipeline["cache"] is True
    assert pipeline["augment_on"] == ("cpu" if trained.augment else None)
    frozen = EXPERIMENTS[trained.name].freeze_backbone
    expected_features = ("val" if trained.augment else "train+val") if frozen else "off"
    assert pipeline["feature_cache"] == expected_features
    assert trained.metrics["mixed_precision"] == "bfloat16"
    test = trained.metrics["test"]
    assert 0.0 <= test["accuracy"] <= 1.0 and np.isfinite(test["macro_f1"])


def test_evaluate_with_tta_reproduces_training_metrics(trained):
    best = trained.out_dir / "checkpoints" / "best.pt"
    metrics = workflow.evaluate_checkpoint(best, trained.name, data_dir=_data_dir(trained),
                                           out=trained.out_dir.parent / "evaluated", tta=True,
                                           runtime=trained.runtime)
    assert metrics["accuracy"] == pytest.approx(trained.metrics["test"]["accuracy"])
    assert "tta" in metrics and 0.0 <= metrics["tta"]["accuracy"] <= 1.0


def test_predict_and_grad_cam(trained, tmp_path):
    model, state = load_trained_model(trained.out_dir / "checkpoints" / "best.pt")
    paths = load_splits(Path(_data_dir(trained)), seed=SEED).test.paths[:3]
    result = predict_images(model, CLASSES, state["preprocessing"], paths, trained.runtime, tta=True,
                            cam_dir=tmp_path / "cam")
    probabilities = result.table[list(CLASSES)].to_numpy()
    assert probabilities.shape == (3, len(CLASSES)) and np.allclose(probabilities.sum(1), 1.0, atol=1e-3)
    assert len(result.cam_files) == 3 and all(path.stat().st_size > 0 for path in result.cam_files)


def _data_dir(trained: Trained) -> str:
    return json.loads((trained.out_dir / "metrics.json").read_text())["dataset"]["root"]


def test_fp16_trains_with_a_grad_scaler(synthetic_root, tmp_path, cuda_like):
    """GPUs without bf16 get fp16 autocast and a GradScaler; both run on the CPU too."""
    fp16 = cuda_like.replace(amp_dtype=torch.float16)
    assert fp16.grad_scaler() is not None and cuda_like.grad_scaler() is None
    with pytest.warns(UserWarning, match="Skipped"):
        metrics = workflow.train_experiment("mobilenet_v2_full", data_dir=synthetic_root, out=tmp_path,
                                            runtime=fp16, options=RunOptions(seed=SEED), **TINY)
    assert metrics["pipeline"]["mixed_precision"] == "float16" and np.isfinite(metrics["test"]["macro_f1"])


def test_missing_gpu_is_a_clear_error(synthetic_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["train", "resnet50_full", "--data-dir", str(synthetic_root), "--out", str(tmp_path), "--device", "cuda"]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: --device cuda was requested but no CUDA GPU is available") and "Traceback" not in error
