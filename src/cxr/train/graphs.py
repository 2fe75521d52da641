"""A fully trained network's forward and backward passes replayed from CUDA graphs.

Fine-tuning all of ResNet50 at batch 64 launches about 840 kernels a step, and on an H200 the host takes
longer to launch them than the device takes to run them (benchmarks/history/results-2946261.md, before graphs: an
epoch took 2.8 s, of which the device's kernels ran 1.6 s). A CUDA graph records a step's kernels once and
replays them with one launch.

:class:`GraphedTraining` wraps the model for ``train_one_epoch``: full training batches run the graphs
(captured at the first one, by ``torch.cuda.make_graphed_callables``), anything else (an epoch's smaller
last batch, evaluation, no autograd) runs the model itself, whose parameters the graphs share. The loss
and the optimizer step stay eager. Capturing runs a few warm-up passes on the first batch; they move
BatchNorm's running statistics, which are put back, so the recipe is unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Capture = Callable[[nn.Module, tuple[torch.Tensor, ...]], nn.Module]


def capture_cuda_graphs(module: nn.Module, sample: tuple[torch.Tensor, ...]) -> nn.Module:
    """``torch.cuda.make_graphed_callables`` on ``module`` (which it changes in place), under the autocast the
    training step uses, without autocast's weight cache (graphs cannot capture it)."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    if dtype is None:
        return torch.cuda.make_graphed_callables(module, sample)
    with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
        return torch.cuda.make_graphed_callables(module, sample)


class _Forward(nn.Module):
    """The model behind one more module, so that capturing replaces this forward and not the model's own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


class GraphedTraining(nn.Module):
    """``model`` for training steps: batches shaped like the first full one replay CUDA graphs, the rest
    run eagerly. ``capture`` makes the graphed module (default: :func:`capture_cuda_graphs`, looked up when
    the first batch comes, so that CPU tests can stand in for it: graphs need a GPU)."""

    def __init__(self, model: nn.Module, full_batch: int, capture: Capture | None = None) -> None:
        super().__init__()
        self.model, self.full_batch, self.capture = model, full_batch, capture
        self.graphed: nn.Module | None = None
        self.captured_as: tuple[torch.Size, tuple[int, ...], torch.dtype] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled() and len(images) == self.full_batch):
            return self.model(images)
        if self.graphed is None:
            self.graphed, self.captured_as = self._capture(images), (images.shape, images.stride(), images.dtype)
        if (images.shape, images.stride(), images.dtype) != self.captured_as:
            return self.model(images)
        return self.graphed(images)

    def _capture(self, images: torch.Tensor) -> nn.Module:
        """Graphs of the model's step on batches like ``images``; its BatchNorm buffers come out as they went in."""
        buffers = {name: buffer.clone() for name, buffer in self.model.named_buffers()}
        graphed = (self.capture or capture_cuda_graphs)(_Forward(self.model), (images.detach().clone(),))
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                buffer.copy_(buffers[name])
        return graphed
