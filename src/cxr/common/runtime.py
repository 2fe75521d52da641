"""How a run executes, decided once: device, precision, memory format, where the data lives, workers.

Every choice that differs between a CUDA GPU and the CPU is made here, in :meth:`Runtime.create`, and
nowhere else; the rest of the package asks the :class:`Runtime` it is given. Tests build a Runtime on the
CPU with the choices a CUDA run makes (:meth:`Runtime.cuda_like`: bf16 autocast, channels_last, fused
AdamW, augmentation on the device, ...) so that every code path a GPU takes also runs in CI, where there
is no GPU. What a run used is written to ``metrics.json`` under ``pipeline`` (:meth:`Runtime.describe`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Iterator

import torch

CACHE_DIR_ENV = "CXR_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$CXR_CACHE_DIR``, else ``$XDG_CACHE_HOME/cxr``, else ``~/.cache/cxr``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cxr"


def select_device(name: str | None = None) -> torch.device:
    """The requested device, or the best available one: cuda, then mps, then cpu."""
    if name and name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:  # torch's own text lists every backend it was built with
            raise ValueError(f"--device {name!r} is not a device; use cuda, mps, cpu or cuda:N.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA GPU is available; use --device cpu "
                             "(or leave --device out to use the best device present).")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores)" if device.type == "cpu" else device.type


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on a CUDA device now; None where no limit is known (any other device)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


# Images per frozen-backbone forward pass on a GPU while the head steps every batch (benchmarks/results.md).
FROZEN_FORWARD_BATCH = 256


def _cuda_amp_dtype() -> torch.dtype:
    """bf16 where the GPU has it (no loss scaling needed), else fp16 (with a GradScaler)."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """Process-wide, like the flag itself; the backward pass runs while this is held (``backward()`` waits)."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed and moved; passed down instead of a device and its options.

    ``amp_dtype`` None means fp32. ``hold_on_device``: a cached split of uint8 images is kept on ``device``
    as one tensor and sliced per batch where it fits (:meth:`holds_on_device`); otherwise it stays in host
    memory and each batch is copied over (:meth:`copy_batch`). ``cache`` decodes each image once into
    ``cache_dir`` (the augmentation then runs on the device); without it PIL decodes and transforms every
    image in ``workers`` DataLoader processes. ``feature_cache``: a frozen backbone's features are computed
    once for each split no augmentation changes (validation; training too without augmentation) and the head
    trains on them. ``frozen_forward_batch``: how many images a frozen backbone turns
    into features at once while its head trains (``pipeline.frozen_forward_batch``); 0 means the step batch.
    ``cuda_graphs``: a fully trained network's forward and backward passes replay CUDA graphs (:mod:`cxr.train.graphs`)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    fused_optimizer: bool = False
    cudnn_benchmark: bool = False
    pin_memory: bool = False
    non_blocking: bool = False
    hold_on_device: bool = False
    workers: int = 0
    compile: bool = False
    cuda_graphs: bool = False
    frozen_forward_batch: int = 0
    cache: bool = True
    feature_cache: bool = True
    cache_dir: Path | None = None
    progress: bool = True

    @classmethod
    def create(cls, device: torch.device | str | None = None, *, workers: int | None = None, compile: bool = False,
               cache: bool = True, cache_dir: str | os.PathLike | None = None, progress: bool = True,
               cuda_graphs: bool | None = None, feature_cache: bool = True, splits_on_device: bool = True) -> Runtime:
        """The choices for ``device`` (default: the best available): on CUDA mixed precision,
        channels_last, fused AdamW, cuDNN autotuning, pinned non-blocking copies, data held on the GPU (where
        it fits; ``splits_on_device=False`` keeps every split in host memory, copied over per batch), a
        frozen backbone run on batches of 256, CUDA graphs for a fully trained network (unless compiled)
        and up to 8 DataLoader workers; elsewhere fp32 in the main process."""
        device = device if isinstance(device, torch.device) else select_device(device)
        cuda = device.type == "cuda"
        if cuda_graphs and not cuda:
            raise ValueError(f"CUDA graphs need a CUDA GPU; this run is on {device.type}: leave cuda_graphs unset.")
        return cls(
            device=device, amp_dtype=_cuda_amp_dtype() if cuda else None, channels_last=cuda, fused_optimizer=cuda,
            cudnn_benchmark=cuda, pin_memory=cuda, non_blocking=cuda, hold_on_device=device.type != "cpu" and splits_on_device,
            workers=(min(8, os.cpu_count() or 1) if cuda else 0) if workers is None else workers,
            compile=compile, cuda_graphs=cuda and not compile if cuda_graphs is None else cuda_graphs,
            frozen_forward_batch=FROZEN_FORWARD_BATCH if cuda else 0, cache=cache, feature_cache=feature_cache,
            cache_dir=Path(cache_dir).expanduser() if cache_dir else None, progress=progress,
        )

    @classmethod
    def cuda_like(cls, device: torch.device | str = "cpu", amp_dtype: torch.dtype = torch.bfloat16,
                  **changes: Any) -> Runtime:
        """What :meth:`create` picks on a CUDA GPU, on another device (for tests): everything except
        pinned memory, cuDNN and CUDA graphs, which need the GPU itself (tests stand in for the graphs'
        capture: tests/test_cuda_paths.py)."""
        device = torch.device(device)
        choices = dict(device=device, amp_dtype=amp_dtype, channels_last=True, fused_optimizer=True,
                       cudnn_benchmark=False, pin_memory=False, non_blocking=True, hold_on_device=True, workers=0,
                       frozen_forward_batch=FROZEN_FORWARD_BATCH)
        return cls(**{**choices, **changes})

    def replace(self, **changes: Any) -> Runtime:
        return dataclasses.replace(self, **changes)

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or default_cache_dir()

    def apply_backend_settings(self) -> None:
        """Process-wide switches: cuDNN picks the fastest kernels for the fixed input shapes (left off
        when deterministic algorithms were asked for)."""
        if self.cudnn_benchmark and not torch.are_deterministic_algorithms_enabled():
            torch.backends.cudnn.benchmark = True

    def tuning(self, batch: int, full_batch: int | None) -> ContextManager:
        """cuDNN autotunes every new input shape once, seconds per shape for a ResNet's backward pass: a
        batch smaller than ``full_batch`` (an epoch's last) runs on cuDNN's heuristic kernels instead of
        being tuned for the one step it takes."""
        return contextlib.nullcontext() if full_batch is None or batch == full_batch else self.one_off()

    def one_off(self) -> ContextManager:
        """Around a pass that runs once (a frozen backbone's BatchNorm statistics and cached features, the test
        evaluation): cuDNN's heuristic kernels, instead of seconds of autotuning for shapes that never return."""
        if not self.cudnn_benchmark or not torch.backends.cudnn.benchmark:
            return contextlib.nullcontext()
        return _cudnn_benchmark(False)

    def autocast(self) -> ContextManager:
        """Mixed precision around a forward pass, or nothing for fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not."""
        return torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None

    def memory_format(self, tensor: torch.Tensor) -> torch.memory_format:
        """channels_last for image batches (rank 4) only: features and logits have no channels to reorder."""
        return torch.channels_last if self.channels_last and tensor.dim() == 4 else torch.contiguous_format

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=self.non_blocking, memory_format=self.memory_format(tensor))

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the device, its convolutions in channels_last when the inputs are."""
        return model.to(self.device, memory_format=torch.channels_last if self.channels_last
                        else torch.preserve_format)

    def holds_on_device(self, nbytes: int) -> bool:
        """Whether a whole split of ``nbytes`` is kept on the device and sliced there per batch: with
        ``hold_on_device`` when it takes under a quarter of the memory free there (so the model, its
        activations and the other splits still fit), and always on the CPU, whose memory the host's is."""
        if not self.hold_on_device:
            return self.device.type == "cpu"
        free = free_device_memory(self.device)
        return free is None or nbytes < free / 4

    def copy_batch(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch sliced from a split held in host memory, on the device: on CUDA through pinned memory,
        without waiting for the copy (the stream orders it before the kernels that read the batch)."""
        return (tensor.pin_memory() if self.pin_memory else tensor).to(self.device, non_blocking=self.non_blocking)

    def precision(self) -> str:
        return str(self.amp_dtype).replace("torch.", "") if self.amp_dtype is not None else "fp32"

    def describe(self) -> dict[str, Any]:
        """The choices, as plain data for ``metrics.json``."""
        return {
            "device": device_name(self.device),
            "mixed_precision": self.precision(),
            "channels_last": self.channels_last,
            "fused_optimizer": self.fused_optimizer,
            "cudnn_benchmark": self.cudnn_benchmark,
            "pin_memory": self.pin_memory,
            "splits_on_device": self.hold_on_device,  # may a cached split live on the device (if it fits)
            "workers": self.workers,
            "compile": self.compile,
            "cuda_graphs": self.cuda_graphs,
            "frozen_forward_batch": self.frozen_forward_batch,
            "cache": self.cache,
            "cache_dir": str(self.resolved_cache_dir) if self.cache else None,
        }
