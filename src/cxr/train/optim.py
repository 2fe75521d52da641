"""The optimiser and learning-rate schedule, each chosen by name (``Experiment.optimizer``, ``.schedule``)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from cxr.config import Experiment
from cxr.models.classifier import Classifier
from cxr.common.runtime import Runtime


def parameter_groups(model: Classifier, experiment: Experiment) -> list[dict[str, Any]]:
    """Trainable parameters only: the head at ``lr``, the trained part of the backbone (if any) at ``backbone_lr``."""
    groups = [{"params": list(model.head.parameters()), "lr": experiment.lr}]
    if not model.freeze_backbone:
        groups.append({"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": experiment.backbone_lr})
    return groups


OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]], Experiment, Runtime], torch.optim.Optimizer]] = {
    "adamw": lambda groups, experiment, runtime: torch.optim.AdamW(
        groups, weight_decay=experiment.weight_decay, fused=runtime.fused_optimizer),
    "sgd": lambda groups, experiment, runtime: torch.optim.SGD(
        groups, momentum=0.9, nesterov=True, weight_decay=experiment.weight_decay, fused=runtime.fused_optimizer),
}


def build_optimizer(model: Classifier, experiment: Experiment, runtime: Runtime) -> torch.optim.Optimizer:
    """The optimiser called ``experiment.optimizer`` (a key of :data:`OPTIMIZERS`) over :func:`parameter_groups`."""
    if experiment.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {experiment.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[experiment.optimizer](parameter_groups(model, experiment), experiment, runtime)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to zero, stepped once per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_constant(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up, then the base learning rate to the end, stepped once per batch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, int, int], torch.optim.lr_scheduler.LRScheduler]] = {
    "warmup+cosine": warmup_cosine,
    "warmup+constant": warmup_constant,
}


def build_schedule(optimizer: torch.optim.Optimizer, experiment: Experiment, steps_per_epoch: int,
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule called ``experiment.schedule`` (a key of :data:`SCHEDULES`) over the whole run, per batch."""
    if experiment.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {experiment.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    return SCHEDULES[experiment.schedule](optimizer, experiment.epochs * steps_per_epoch,
                                          experiment.warmup_epochs * steps_per_epoch)
