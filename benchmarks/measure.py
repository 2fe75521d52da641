"""What ours costs and what the hardware allows: our pipeline end to end, our training step alone on
synthetic device tensors (the ceiling, and the variants the defaults were chosen against), our loader
alone, and torch.profiler's operator tables."""

from __future__ import annotations

import gc
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from cxr.train import engine
from cxr.config import Experiment
from cxr.data.dataset import load_splits
from cxr.data.layout import CLASSES
from cxr.train.features import FrozenBackboneBatches
from cxr.models.classifier import build_model, preprocessing
from cxr.train.optim import build_optimizer, warmup_cosine
from cxr.train.pipeline import build_dataset, frozen_forward_batch, make_loader, training_module
from cxr.common.runtime import Runtime
from cxr.common.timing import PhaseTimes

REPOSITORY = Path(__file__).resolve().parents[1]
GIB = 1024**3


def synchronize(device: torch.device) -> None:
    """Wait for the device, so the time read next includes the work queued on it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a measurement's peak memory afresh: what the previous one left is freed first."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """The most device memory allocated since :func:`reset_peak_memory` (none on the CPU: not tracked)."""
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------ ceiling


class SyntheticLoader:
    """The same batch, already on the device, ``batches`` times: what the ceiling trains on. It has the
    ``batch_size`` and ``sampler`` a :class:`FrozenBackboneBatches` reads."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batches: int) -> None:
        self.images, self.labels, self.batches = images, labels, batches
        self.batch_size, self.sampler = len(labels), range(len(labels) * batches)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.batches):
            yield self.images, self.labels


def measure_ceiling(experiment: Experiment, runtime: Runtime, steps: int, warmup: int = 5,
                    torch_loss: bool = False) -> dict[str, Any]:
    """Our training step alone, ``fit``'s way (a frozen backbone runs forward on ``runtime``'s
    frozen_forward_batch images at once and the head steps every batch; fit's loss), on synthetic batches already
    on the device. The warm-up (cuDNN autotuning; compiling, with ``runtime.compile``) is reported as
    ``warmup_seconds``. ``torch_loss``: PyTorch's own class-weighted, label-smoothed ``nn.CrossEntropyLoss``
    instead of fit's (``cxr.train.losses``), to show what its host sync per step costs."""
    device = runtime.device
    reset_peak_memory(device)
    torch.backends.cudnn.benchmark = runtime.cudnn_benchmark
    with device:
        model = build_model(experiment.arch, len(CLASSES), "none", experiment.trainable_blocks,
                            experiment.image_size)
    model = runtime.prepare_model(model)
    if runtime.compile:
        model.backbone.compile()
    optimizer = build_optimizer(model, experiment, runtime)
    batch = experiment.batch_size
    forward = frozen_forward_batch(batch, runtime) if model.freeze_backbone else batch
    images = runtime.to_device(torch.randn(forward, 3, experiment.image_size, experiment.image_size))
    labels = torch.randint(0, len(CLASSES), (forward,), device=device)
    criterion = engine.training_loss(labels.tolist(), experiment, device)  # fit's loss, class weights included
    if torch_loss:
        criterion = nn.CrossEntropyLoss(weight=criterion.weight, label_smoothing=experiment.label_smoothing)
    per_forward = forward // batch

    def steps_of(count: int):
        loader = SyntheticLoader(images, labels, math.ceil(count / per_forward))
        if model.freeze_backbone:
            return model.head, FrozenBackboneBatches(model.backbone, loader, runtime, batch)
        return trained, loader

    trained = training_module(model, batch, runtime)
    scheduler = warmup_cosine(optimizer, warmup + steps + 2 * per_forward, 1)

    module, batches = steps_of(warmup)
    started = time.perf_counter()
    engine.train_one_epoch(module, batches, criterion, optimizer, scheduler, runtime)
    synchronize(device)
    warmup_seconds = time.perf_counter() - started
    module, batches = steps_of(steps)
    started = time.perf_counter()
    engine.train_one_epoch(module, batches, criterion, optimizer, scheduler, runtime)  # ends with .item(): synced
    seconds = time.perf_counter() - started
    timed = len(batches)
    torch.backends.cudnn.benchmark = False
    return {"images_per_second": round(timed * batch / seconds, 1), "steps": timed, "batch_size": batch,
            "forward_batch": forward, "precision": runtime.precision(), "compile": runtime.compile,
            "cudnn_benchmark": runtime.cudnn_benchmark, "cuda_graphs": runtime.cuda_graphs, "torch_loss": torch_loss,
            "warmup_seconds": round(warmup_seconds, 1),
            "peak_memory_gib": peak_memory_gib(device)}


def ceiling_variants(experiment: Experiment, device: torch.device) -> dict[str, tuple[Runtime, bool]]:
    """The ceilings measured, as (runtime, PyTorch's loss instead of fit's): ``fit``'s default, then what
    it was chosen against."""
    default = Runtime.create(device, progress=False)
    variants = {"ceiling": (default, False), "ceiling_torch_loss": (default, True)}
    if experiment.freeze_backbone and frozen_forward_batch(experiment.batch_size, default) > experiment.batch_size:
        variants["ceiling_forward_at_step_batch"] = (default.replace(frozen_forward_batch=0), False)
    elif device.type == "cuda":
        variants["ceiling_no_cuda_graphs"] = (default.replace(cuda_graphs=False), False)
        variants["ceiling_no_cudnn_benchmark"] = (default.replace(cudnn_benchmark=False), False)
    return variants


# --------------------------------------------------------------------------------------------- ours


def run_ours(experiment: Experiment, data_root: Path, cache_dir: Path, out_dir: Path, device: torch.device,
             profile_to: Path | None = None) -> dict[str, Any]:
    """Scan, fit (train + validation every epoch, checkpoints) and predict the test split, timed as a whole
    and split into the epochs (training loop, validation, checkpoint) and what surrounds them, step by step.
    With ``profile_to`` the epochs after the first (which holds cuDNN autotuning) are profiled
    (torch.profiler, CPU and CUDA activity) and the top operators are written there."""
    reset_peak_memory(device)
    profiler = torch_profiler(device) if profile_to and experiment.epochs > 1 else None
    on_epoch_end = _profile_after_first_epoch(profiler, experiment.epochs, device) if profiler else None
    started = time.perf_counter()
    splits = load_splits(data_root)
    scan_seconds = time.perf_counter() - started
    runtime = Runtime.create(device, cache_dir=cache_dir, progress=False)
    phases = PhaseTimes()  # what fit spends its time on, besides the epochs' training and validation
    result = engine.fit(experiment, splits, out_dir, runtime, seed=42, on_epoch_end=on_epoch_end, phase_timer=phases)
    spent = phases.spent
    test_started = time.perf_counter()
    logits, labels, test_info = _predict_test(result.model, splits, experiment, runtime)
    finished = time.perf_counter()
    seconds, test_seconds = finished - started, finished - test_started - test_info.get("cache_seconds", 0.0)
    saves = spent["checkpoint save"]
    epochs = [row["seconds"] + save for row, save in zip(result.history, saves)]  # training, validation, checkpoint
    epoch_seconds = _steady(epochs)
    pipeline = result.extra["pipeline"]
    cache_seconds = pipeline["cache_seconds"] + test_info.get("cache_seconds", 0.0)
    row = {
        "images_per_second": round(len(splits.train) / epoch_seconds, 1),
        "epoch_seconds": round(epoch_seconds, 3),
        "epoch_parts": {"training loop": round(_steady(spent["train"]), 3),
                        "validation": round(_steady(spent["validate"]), 3),
                        "checkpoint (host copy, wait for the previous write)": round(_steady(saves), 3)},
        "first_epoch_seconds": round(epochs[0], 3),
        "experiment_seconds": round(seconds, 1),
        "epochs": len(epochs),
        "train_seconds": round(result.train_seconds, 1),
        "checkpoint_seconds": round(sum(saves), 2),
        "cache_seconds": round(cache_seconds, 2),
        "images_decoded": pipeline["images_decoded"] + test_info.get("decoded", 0)
        if isinstance(pipeline["images_decoded"], int) else pipeline["images_decoded"],
        "outside_epochs": _outside_epochs(seconds - sum(epochs), spent, pipeline, scan=scan_seconds,
                                          cache=cache_seconds, test=test_seconds),
        "test_accuracy": round(float((logits.argmax(1) == labels).mean()), 4),
        "pipeline": pipeline,
        "peak_memory_gib": peak_memory_gib(device),
    }
    if profiler:
        row["profile"] = write_profile(profiler, profile_to, sum(epochs[1:]), len(epochs) - 1)
    return row


def _steady(values: list[float]) -> float:
    """The median epoch after the first (which autotunes cuDNN)."""
    return statistics.median(values[1:] or values)


def _profile_after_first_epoch(profiler: torch.profiler.profile, epochs: int,
                               device: torch.device) -> Callable[[list[dict[str, float]]], None]:
    """fit's ``on_epoch_end``: profiles the epochs after the first, which holds cuDNN autotuning."""

    def on_epoch_end(history: list[dict[str, float]]) -> None:
        if len(history) == 1:
            synchronize(device)
            profiler.start()
        elif len(history) == epochs:
            synchronize(device)
            profiler.stop()

    return on_epoch_end


def _predict_test(model: nn.Module, splits, experiment: Experiment, runtime: Runtime) -> tuple[Any, Any, dict]:
    """The test split's logits and labels, as ``cxr train`` predicts them, and its dataset's cache info."""
    prep = preprocessing(experiment.arch, experiment.image_size)
    test_set, _, test_info = build_dataset(splits.test, experiment, prep, runtime, False)
    loader = make_loader(test_set, experiment.batch_size, False, runtime)
    with runtime.one_off():  # as workflow.evaluate_model
        logits, labels = engine.predict(model, loader, runtime)
    synchronize(runtime.device)
    return logits, labels, test_info


def _outside_epochs(outside: float, spent: dict[str, list[float]], pipeline: dict[str, Any], *, scan: float,
                    cache: float, test: float) -> dict[str, float]:
    """The seconds of a run outside its epochs, step by step; "other" is what no step accounts for."""
    steps = {
        "scan": scan,
        "image cache (decode or read)": cache,
        "model build": sum(spent["model build"]),
        "BatchNorm statistics": sum(spent["BatchNorm statistics"]),
        "frozen-backbone features (validation)": pipeline["feature_seconds"],
        "last checkpoint write (wait)": sum(spent["checkpoint wait"]),
        "best.pt reload": sum(spent["best.pt reload"]),
        "test split (predictions)": test,
    }
    steps["other"] = outside - sum(steps.values())
    return {"total": round(outside, 2), **{name: round(value, 2) for name, value in steps.items()}}


def torch_profiler(device: torch.device) -> torch.profiler.profile:
    """A profiler of CPU activity, and of CUDA activity on a GPU."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def write_profile(profiler: torch.profiler.profile, path: Path, wall_seconds: float, epochs: int,
                  rows: int = 25) -> dict[str, Any]:
    """The profiler's operator table (sorted by device time on CUDA, CPU time elsewhere) into ``path``; returns
    how busy the device was (its kernels and copies, each counted once) and the operators that kept it busiest."""
    averages = profiler.key_averages()
    on_cuda = any(event.device_type == torch.autograd.DeviceType.CUDA for event in averages)
    key = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    host = "" if not on_cuda else ("\nThe same operators by host time (where the host, not the device, is busy):\n\n"
                                   + averages.table(sort_by="self_cpu_time_total", row_limit=15))
    path.write_text(averages.table(sort_by=key, row_limit=rows) + "\n" + host + "\n")
    device_events = [e for e in averages if (e.device_type == torch.autograd.DeviceType.CUDA) == on_cuda]
    operators = [e for e in averages if e.device_type == torch.autograd.DeviceType.CPU]
    top = sorted(operators, key=lambda event: getattr(event, key), reverse=True)[:8]
    return {"table": str(path.relative_to(REPOSITORY) if path.is_relative_to(REPOSITORY) else path),
            "sorted_by": key, "epochs": epochs, "busy_seconds": round(sum(getattr(e, key) for e in device_events) / 1e6, 2),
            "wall_seconds": round(wall_seconds, 2),
            "top": {event.key: round(getattr(event, key) / 1e6, 3) for event in top}}


# ------------------------------------------------------------------------------------- our loader alone


def measure_our_loader(experiment: Experiment, splits, cache_dir: Path, device: torch.device) -> dict[str, Any]:
    """Our loader alone for one epoch: slicing the cached uint8 split and augmenting it on the device."""
    prep = preprocessing(experiment.arch, experiment.image_size)
    runtime = Runtime.create(device, cache_dir=cache_dir, progress=False)
    train_set, _, _ = build_dataset(splits.train, experiment, prep, runtime, True)
    loader = make_loader(train_set, experiment.batch_size, True, runtime, seed=0)
    next(iter(loader))  # warm-up: kernels and allocator (each iteration starts the same epoch afresh)
    synchronize(device)
    started = time.perf_counter()
    for _ in loader:
        pass
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"images_per_second": round(len(train_set) / seconds, 1), "images": len(train_set),
            "augment_on": device.type}
