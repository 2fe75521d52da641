"""The losses chosen by name: weighted cross-entropy equals PyTorch's without its host sync; focal loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxr.config import get_experiment
from cxr.train.engine import class_weights, training_loss, validation_loss
from cxr.train.loss_functions import FocalLoss, WeightedSmoothedCrossEntropy
from cxr.train.losses import LOSSES, build_loss


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


def _logits_targets(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.rand(4, generator=generator, dtype=torch.float64) + 0.5
    return weight, torch.randn(32, 4, generator=generator, dtype=torch.float64) * 3, torch.randint(0, 4, (32,), generator=generator)


def test_focal_loss_is_the_weighted_cross_entropy_at_gamma_zero_and_down_weights_easy_images():
    weight, logits, target = _logits_targets()
    torch.testing.assert_close(FocalLoss(weight, 0.0).double()(logits, target),
                               nn.CrossEntropyLoss(weight=weight)(logits, target))
    p = logits.softmax(1).gather(1, target[:, None]).squeeze(1)
    alpha = weight[target]
    by_hand = -(alpha * (1 - p) ** 2 * p.log()).sum() / alpha.sum()
    torch.testing.assert_close(FocalLoss(weight, 2.0).double()(logits, target), by_hand, atol=1e-6, rtol=1e-6)
    assert FocalLoss(weight, 2.0)(logits, target) < FocalLoss(weight, 0.0)(logits, target)


def test_build_loss_picks_by_name_and_refuses_unknown_names():
    weight, logits, target = _logits_targets(3)
    smoothed = get_experiment("resnet50_full", label_smoothing=0.1)
    assert isinstance(build_loss(smoothed, weight), WeightedSmoothedCrossEntropy)
    unsmoothed = build_loss(smoothed, weight, validation=True)(logits.float(), target)
    assert torch.equal(unsmoothed, nn.CrossEntropyLoss(weight=weight.float())(logits.float(), target))  # bit for bit
    focal = build_loss(get_experiment("resnet50_full", loss="focal", focal_gamma=3.0, label_smoothing=0.1), weight)
    assert isinstance(focal, FocalLoss) and focal.gamma == 3.0 and torch.equal(focal.alpha, weight.float())
    with pytest.raises(ValueError, match="unknown loss 'dice'; choose one of: weighted_ce, focal"):
        build_loss(get_experiment("resnet50_full", loss="dice"), weight)


def test_a_run_with_an_unknown_loss_is_refused_before_anything_is_written(tmp_path):
    from cxr.workflow import train_experiment

    with pytest.raises(ValueError, match="unknown loss 'dice'; choose one of: weighted_ce, focal"):
        train_experiment("mobilenet_v2_head", data_dir=tmp_path / "no-data", out=tmp_path / "out", loss="dice")
    assert not (tmp_path / "out").exists()


def test_the_loss_names_are_the_keys_of_LOSSES_alone(monkeypatch):
    """A new loss is one entry of LOSSES: the experiment accepts it and build_loss returns it; the command
    line's choices are LOSSES' keys, with no other list of names to keep in step."""
    from cxr.cli import build_parser

    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    assert tuple(next(a for a in train._actions if a.dest == "loss").choices) == tuple(LOSSES)

    def dice(class_weights, experiment, label_smoothing):
        return nn.L1Loss()

    monkeypatch.setitem(LOSSES, "dice", dice)
    assert isinstance(build_loss(get_experiment("resnet50_full", loss="dice"), torch.ones(4)), nn.L1Loss)
    monkeypatch.delitem(LOSSES, "dice")
    with pytest.raises(ValueError, match="unknown loss 'dice'"):
        build_loss(get_experiment("resnet50_full", loss="dice"), torch.ones(4))


def test_training_and_validation_use_the_experiments_loss():
    labels = [0, 0, 0, 1, 2, 3, 3]
    focal = get_experiment("resnet50_full", loss="focal", focal_gamma=2.0)
    train, val = training_loss(labels, focal, torch.device("cpu")), validation_loss(labels, focal)
    assert isinstance(train, FocalLoss) and isinstance(val, FocalLoss) and train.gamma == val.gamma == 2.0
    assert torch.equal(train.alpha, class_weights(labels)) and torch.equal(val.alpha, class_weights(labels))
    full = get_experiment("resnet50_full")
    assert isinstance(training_loss(labels, full, torch.device("cpu")), WeightedSmoothedCrossEntropy)
    assert isinstance(validation_loss(labels, full), nn.CrossEntropyLoss)  # unsmoothed, class-weighted
