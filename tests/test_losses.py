"""The training loss equals PyTorch's class-weighted, label-smoothed cross-entropy, without its host sync."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxr.losses import WeightedSmoothedCrossEntropy


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_same_value_and_gradients_as_cross_entropy_loss(smoothing):
    generator = torch.Generator().manual_seed(0)
    weight = torch.tensor([3.4, 1.2, 0.4, 2.4])
    logits = torch.randn(16, 4, generator=generator, dtype=torch.float64) * 3
    target = torch.randint(0, 4, (16,), generator=generator)
    ours_logits, theirs_logits = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = WeightedSmoothedCrossEntropy(weight.double(), smoothing).double()(ours_logits, target)
    theirs = nn.CrossEntropyLoss(weight=weight.double(), label_smoothing=smoothing)(theirs_logits, target)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_logits.grad, theirs_logits.grad)


def test_under_bf16_autocast_it_computes_in_float32_like_cross_entropy():
    generator = torch.Generator().manual_seed(1)
    weight = torch.rand(4, generator=generator) + 0.5
    logits = torch.randn(8, 4, generator=generator).bfloat16()
    target = torch.randint(0, 4, (8,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = WeightedSmoothedCrossEntropy(weight, 0.1)(logits, target)
        theirs = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)(logits, target)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)


def test_no_operation_whose_result_size_only_the_device_knows():
    """``nn.CrossEntropyLoss`` with weights and smoothing calls ``masked_select`` (a host-device sync on a GPU)."""
    weight, logits, target = torch.rand(4), torch.randn(8, 4, requires_grad=True), torch.randint(0, 4, (8,))

    def operators(criterion: nn.Module) -> set[str]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            criterion(logits, target).backward()
        return {event.key for event in profile.key_averages()}

    syncing = {"aten::masked_select", "aten::nonzero", "aten::item", "aten::_local_scalar_dense"}
    assert operators(nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)) & syncing  # the check can fail
    assert not operators(WeightedSmoothedCrossEntropy(weight, 0.1)) & syncing
