"""The training loss: class-weighted cross-entropy with label smoothing, without a host sync per step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightedSmoothedCrossEntropy(nn.Module):
    """``nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)``: the same value and gradients
    (mean over the batch, normalised by the targets' weights; every target a class index).

    PyTorch computes that combination with ``masked_select``, whose output size only the device knows: on a
    GPU every training step then waits until the forward pass has finished before it can queue the backward
    pass, and the device idles while the host launches it (benchmarks/results.md). Here the same sums are
    taken with ``gather``, which never waits."""

    def __init__(self, weight: torch.Tensor, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=1)  # fp32, as autocast runs cross_entropy
        target_weight = self.weight.gather(0, target)
        nll = -(log_probs.gather(1, target.unsqueeze(1)).squeeze(1) * target_weight).sum()
        smooth = -(log_probs * self.weight).sum()
        smoothing = self.label_smoothing
        return ((1 - smoothing) * nll + smoothing / logits.shape[1] * smooth) / target_weight.sum()
