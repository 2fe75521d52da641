"""CUDA-only steps on the CPU with the choices a CUDA run makes (``Runtime.cuda_like``): torch.compile, cuDNN
autotuning of full batches only, training steps that never wait for the device, a split too large for the GPU
copied per batch, and CUDA graphs (a stand-in for ``torch.cuda.make_graphed_callables``). Split from
test_cuda_paths.py, which trains every experiment with those choices, so the two run on separate workers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr import workflow
from cxr.cli import main
from cxr.config import EXPERIMENTS
from cxr.data.dataset import load_splits
from cxr.data.layout import CLASSES
from cxr.train.run_options import RunOptions
from cxr.common.runtime import Runtime

# The synthetic set holds unusable files on purpose; the ``trained`` fixture asserts that training warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:Skipped .* unusable file")

TINY = {"epochs": 1, "batch_size": 8, "image_size": 32, "weights": "none"}
SEED = 3


# A fully trained and a frozen backbone; the frozen one is the lightest to trace (ViT-B/16 took 23-30 s here).
@pytest.mark.parametrize("name", ["resnet50_full", "mobilenet_v2_head"])
def test_compiled_model_trains_evaluates_and_explains(name, synthetic_root, tmp_path, cuda_like, monkeypatch):
    """``--compile`` with the CUDA choices: torch.compile traces the backbone (dynamo and AOT autograd with the
    ``aot_eager`` backend here; inductor's code generation is left to the GPU), training (for a frozen backbone:
    its forward on 256 images at once) and evaluation run through the compiled graph, and Grad-CAM still gets
    its gradients."""
    compile_module = torch.nn.Module.compile
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: (compiled.append(type(self).__name__),
                                            compile_module(self, backend="aot_eager", **kw))[1])
    with pytest.warns(UserWarning, match="Skipped"):
        metrics = workflow.train_experiment(name, data_dir=synthetic_root, out=tmp_path,
                                            runtime=cuda_like.replace(compile=True), options=RunOptions(seed=SEED),
                                            **TINY)
    assert compiled == ["ResNet" if name.startswith("resnet") else "MobileNetV2"]
    assert metrics["pipeline"]["compile"] is True and np.isfinite(metrics["test"]["macro_f1"])
    assert (tmp_path / name / "cam.png").stat().st_size > 0


class _RecordsAutotuning(torch.nn.Module):
    """A linear classifier that notes, per batch, whether cuDNN autotuning was on in its forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, len(CLASSES))
        self.seen: list[tuple[int, bool, str]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append((len(images), torch.backends.cudnn.benchmark, "forward"))
        out = self.linear(images.mean(dim=(2, 3)))
        if out.requires_grad:
            out.register_hook(lambda grad: self.seen.append((len(grad), torch.backends.cudnn.benchmark, "backward")))
        return out


def test_only_full_batches_are_autotuned(monkeypatch):
    """cuDNN tunes each new input shape once, seconds per shape for a ResNet's backward pass; an epoch's last,
    smaller batch (training, validation, features) runs untuned, and the setting comes back afterwards."""
    from cxr.data.augment import DeviceDataset, DeviceLoader
    from cxr.train.engine import predict, train_one_epoch
    from cxr.train.optim import warmup_cosine
    from cxr.train.features import FrozenBackboneBatches, extract_features

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    runtime = Runtime.cuda_like("cpu", cudnn_benchmark=True, progress=False)
    dataset = DeviceDataset(torch.rand(10, 3, 8, 8), torch.arange(10) % len(CLASSES))
    model = _RecordsAutotuning()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, DeviceLoader(dataset, 4, True, runtime), torch.nn.CrossEntropyLoss(), optimizer,
                    warmup_cosine(optimizer, 3, 1), runtime)
    assert model.seen == [(4, True, "forward"), (4, True, "backward")] * 2 + [(2, False, "forward"), (2, False, "backward")]
    model.seen.clear()
    predict(model, DeviceLoader(dataset, 4, False, runtime), runtime)
    assert model.seen == [(4, True, "forward")] * 2 + [(2, False, "forward")]
    model.seen.clear()
    list(FrozenBackboneBatches(model, DeviceLoader(dataset, 8, True, runtime), runtime, step_batch=4))
    assert model.seen == [(8, True, "forward"), (2, False, "forward")]
    model.seen.clear()
    extract_features(model, DeviceLoader(dataset, 4, False, runtime), runtime)
    assert model.seen == [(4, True, "forward")] * 2 + [(2, False, "forward")]
    assert torch.backends.cudnn.benchmark is True
    with Runtime.cuda_like("cpu", cudnn_benchmark=False).tuning(2, 4):
        assert torch.backends.cudnn.benchmark is True  # a runtime that never asked for autotuning leaves it alone



HOST_SYNCS = {"aten::masked_select", "aten::nonzero", "aten::item", "aten::_local_scalar_dense"}


def _host_syncs(name: str, data_dir: Path, runtime: Runtime, steps: int) -> list[str]:
    """Operators that make the host wait for the device in a ``train_one_epoch`` of ``steps`` batches, fit's
    way (its pipeline and loss). The optimizer's are left out: fused AdamW reads its step counters on the
    host only on the CPU (on CUDA they are device tensors that its kernel reads)."""
    import itertools

    from cxr.train import engine
    from cxr.train import pipeline as data_pipeline
    from cxr.config import get_experiment
    from cxr.models.classifier import build_model, preprocessing

    experiment = get_experiment(name, **{**TINY, "batch_size": 4})
    torch.manual_seed(SEED)
    model = runtime.prepare_model(build_model(experiment.arch, len(CLASSES), "none", experiment.trainable_blocks,
                                              experiment.image_size))
    with pytest.warns(UserWarning, match="Skipped"):
        pipeline = data_pipeline.build_pipeline(experiment, load_splits(data_dir), model,
                                         preprocessing(experiment.arch, experiment.image_size), runtime, SEED)
    criterion = engine.EpochRunner(experiment, pipeline, runtime, SEED).criterion
    state = engine.build_training_state(model, experiment, runtime, steps)
    batches = itertools.islice(data_pipeline.training_batches(pipeline, experiment.batch_size, runtime, SEED), steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        engine.train_one_epoch(pipeline.train_module, batches, criterion, state.optimizer, state.scheduler, runtime)

    def in_optimizer(event) -> bool:
        while event is not None:
            if event.name.startswith("Optimizer.step"):
                return True
            event = event.cpu_parent
        return False

    return [event.name for event in profile.events() if event.name in HOST_SYNCS and not in_optimizer(event)]


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_training_steps_never_wait_for_the_device(name, synthetic_root, cuda_like):
    """A training step that reads a value the device computes (``.item()``, or an operator whose output size
    only the device knows) stops the host from queueing the next kernels until the device has caught up. On
    an H200 a step of fit's former loss (``nn.CrossEntropyLoss`` with class weights and label smoothing)
    did so: only the end of an epoch may wait, however many steps it has."""
    two, five = (_host_syncs(name, synthetic_root, cuda_like, steps) for steps in (2, 5))
    assert two == five
    assert "aten::masked_select" not in five and "aten::nonzero" not in five


def test_passes_that_run_once_are_not_autotuned(synthetic_root, monkeypatch):
    """A frozen random backbone's BatchNorm statistics and validation features are computed once: autotuning
    their shapes would cost seconds and never pay. Its training forward passes are tuned."""
    from cxr.train import pipeline as data_pipeline
    from cxr.config import get_experiment
    from cxr.models.classifier import build_model, preprocessing

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    runtime = Runtime.cuda_like("cpu", cudnn_benchmark=True, progress=False, frozen_forward_batch=8)
    experiment = get_experiment("resnet152_head", **{**TINY, "batch_size": 4})
    model = runtime.prepare_model(build_model(experiment.arch, len(CLASSES), "none", 0, experiment.image_size))
    tuned: list[bool] = []
    model.backbone.register_forward_pre_hook(lambda module, args: tuned.append(torch.backends.cudnn.benchmark))
    with pytest.warns(UserWarning, match="Skipped"):
        pipeline = data_pipeline.build_pipeline(experiment, load_splits(synthetic_root), model,
                                         preprocessing(experiment.arch, experiment.image_size), runtime, SEED)
    assert pipeline.info["batchnorm_statistics"].startswith("estimated") and pipeline.info["feature_cache"] == "val"
    assert tuned and not any(tuned)
    tuned.clear()
    next(iter(data_pipeline.training_batches(pipeline, experiment.batch_size, runtime, SEED)))
    assert tuned == [True] and torch.backends.cudnn.benchmark is True


def _stand_in_for_cuda_graphs(replays: list[tuple[int, ...]]):
    """What ``torch.cuda.make_graphed_callables`` does that can be done without a GPU: warm-up passes (forward
    and gradients, which move BatchNorm's running statistics), then a module that accepts only the sample's
    shape. ``replays`` records each call of it."""
    def capture(module, sample):
        for _ in range(3):
            output = module(*sample)
            torch.autograd.grad(output.float().sum(), [p for p in module.parameters() if p.requires_grad])
        eager, shape = module.forward, sample[0].shape

        def replay(images):
            assert images.shape == shape, "a graph replays only the shape it was captured with"
            replays.append(tuple(images.shape))
            return eager(images)

        module.forward = replay
        return module
    return capture


@pytest.mark.parametrize("name", ["resnet50_full", "mobilenet_v2_head"])
def test_a_split_too_large_for_the_gpu_is_copied_batch_by_batch(name, synthetic_root, tmp_path, cuda_like,
                                                                monkeypatch):
    """A split over a quarter of the GPU's free memory stays in host memory and each batch goes through pinned
    memory to the device (for a frozen backbone: to its forward pass and its cached validation features). The
    run is the one with the splits on the device, bit for bit. The CPU has neither free GPU memory to ask nor
    pinned memory: stand-ins say that none is free and note what would have been pinned."""
    from cxr.train import engine
    from cxr.common import runtime as runtime_module
    from cxr.config import get_experiment

    experiment, splits = get_experiment(name, **{**TINY, "epochs": 2}), load_splits(synthetic_root)
    held = engine.fit(experiment, splits, tmp_path / "held", cuda_like, seed=SEED)
    pinned: list[torch.Size] = []
    monkeypatch.setattr(runtime_module, "free_device_memory", lambda device: 0)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor: (pinned.append(tensor.shape), tensor)[1])
    copied = engine.fit(experiment, splits, tmp_path / "copied", cuda_like.replace(pin_memory=True), seed=SEED)
    assert held.extra["pipeline"]["data_on"] == "cpu"
    assert copied.extra["pipeline"]["data_on"] == "host memory, copied to the device per batch"
    image_batches = [shape for shape in pinned if len(shape) == 4]
    assert image_batches and len({shape[1:] for shape in image_batches}) == 1  # uint8 squares, one channel
    assert len(pinned) == 2 * len(image_batches)  # each batch's labels too
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in held.history] == [
        {k: v for k, v in row.items() if k != "seconds"} for row in copied.history]


def test_cuda_graphs_change_nothing_but_how_full_batches_run(synthetic_root, tmp_path, cuda_like, monkeypatch):
    """With ``cuda_graphs`` a fully trained network's full batches go through the captured module and the rest
    (an epoch's last batch, validation) through the model; the run is the one without graphs, bit for bit:
    capturing's warm-up passes leave BatchNorm's statistics as they were."""
    from cxr.train import engine
    from cxr.train import graphs
    from cxr.models.checkpoint import load_checkpoint
    from cxr.config import get_experiment

    replays: list[tuple[int, ...]] = []
    monkeypatch.setattr(graphs, "capture_cuda_graphs", _stand_in_for_cuda_graphs(replays))
    experiment = get_experiment("resnet50_full", **{**TINY, "epochs": 2})
    splits = load_splits(synthetic_root)
    plain = engine.fit(experiment, splits, tmp_path / "plain", cuda_like, seed=SEED)
    assert replays == []
    graphed = engine.fit(experiment, splits, tmp_path / "graphed", cuda_like.replace(cuda_graphs=True), seed=SEED)
    full_batches = len(splits.train) // experiment.batch_size
    assert len(splits.train) % experiment.batch_size and replays == [(8, 3, 32, 32)] * full_batches * 2
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in plain.history] == [
        {k: v for k, v in row.items() if k != "seconds"} for row in graphed.history]
    for name in ("best.pt", "last.pt"):
        saved = [load_checkpoint(run / "checkpoints" / name)["model"] for run in (tmp_path / "plain", tmp_path / "graphed")]
        assert all(torch.equal(saved[0][key], saved[1][key]) for key in saved[0]), name
    assert graphed.extra["pipeline"]["cuda_graphs"] is True and plain.extra["pipeline"]["cuda_graphs"] is False
    replays.clear()
    frozen = engine.fit(get_experiment("resnet152_head", **TINY), splits, tmp_path / "frozen",
                        cuda_like.replace(cuda_graphs=True), seed=SEED)
    assert replays == [] and frozen.extra["pipeline"]["cuda_graphs"] is False  # allowed, but nothing to graph


def test_cuda_graphs_only_for_a_fully_trained_network_in_one_process():
    from cxr.train.pipeline import training_module
    from cxr.train.graphs import GraphedTraining
    from cxr.models.classifier import build_model

    runtime = Runtime.cuda_like("cpu", cuda_graphs=True)
    full, frozen = (build_model("resnet50", len(CLASSES), "none", blocks, 32) for blocks in ("all", 0))
    assert isinstance(training_module(full, 8, runtime), GraphedTraining)
    assert training_module(frozen, 8, runtime) is frozen
    assert training_module(full, 8, runtime.replace(compile=True)) is full
    assert training_module(full, 8, runtime.replace(cuda_graphs=False)) is full
    assert Runtime.create("cpu").cuda_graphs is False


def test_cuda_graphs_asked_for_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA GPU; this run is on cpu"):
        Runtime.create("cpu", cuda_graphs=True)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_graphs_check.py"
    spec = importlib.util.spec_from_file_location("cuda_graphs_check", script)  # in this process: no second torch import
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    monkeypatch.setattr(sys, "argv", [str(script), "--data-dir", str(tmp_path)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as done:
        check.main()
    assert str(done.value) == "error: CUDA graphs need a CUDA GPU, and none is available here."


def test_how_to_run_flags_reach_the_runtime(synthetic_root, tmp_path, monkeypatch):
    """``--no-cuda-graphs``, ``--compile``, ``--no-cache`` and ``--feature-cache off`` are the Runtime's
    choices, made once in :meth:`Runtime.create`; the experiment's configuration has none of them."""
    from cxr import workflow

    class Made(Exception):
        pass

    asked = []

    def create(*args, **kwargs):
        asked.append({key: kwargs.get(key, "missing") for key in ("cuda_graphs", "compile", "cache", "feature_cache")})
        raise Made

    monkeypatch.setattr(workflow.Runtime, "create", create)
    for flags in ([], ["--no-cuda-graphs"], ["--compile", "--no-cache", "--feature-cache", "off"]):
        with pytest.raises(Made):
            main(["train", "resnet50_full", "--data-dir", str(synthetic_root), "--out", str(tmp_path), *flags])
    # cuda_graphs None: Runtime.create decides (on for a fully trained network on CUDA)
    assert asked == [{"cuda_graphs": None, "compile": False, "cache": True, "feature_cache": True},
                     {"cuda_graphs": False, "compile": False, "cache": True, "feature_cache": True},
                     {"cuda_graphs": None, "compile": True, "cache": False, "feature_cache": False}]
    assert not {"cache", "compile", "feature_cache"} & set(EXPERIMENTS["resnet50_full"].to_dict())
