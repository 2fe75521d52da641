"""The loss modules behind :data:`cxr.train.losses.LOSSES`: class-weighted cross-entropy with label smoothing, and
focal loss; neither needs a host sync per step."""

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


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017): cross-entropy scaled by ``(1 - p_target) ** gamma``, so
    images the model already gets right count less and the hard ones, often of the rarer classes, more.
    ``alpha`` weighs each class (here the training split's class weights); the sum is normalised by the
    targets' alphas like the weighted cross-entropy, so ``gamma=0`` is exactly that loss. Computed with
    ``gather`` in float32: no host sync per step."""

    def __init__(self, alpha: torch.Tensor, gamma: float = 2.0) -> None:
        super().__init__()
        self.register_buffer("alpha", alpha.float())
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        target_alpha = self.alpha.gather(0, target)
        focus = (1 - log_p.exp()).clamp(min=0) ** self.gamma
        return -(target_alpha * focus * log_p).sum() / target_alpha.sum()
