"""The typical notebook pipeline, reimplemented and timed: what "x times faster than seed-style" compares with.

fp32, PIL decode and torchvision transforms on every access in DataLoader workers, the whole network in
train mode (a "frozen" backbone only has ``requires_grad`` off), ``.item()`` every step.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import models as tvm

from cxr.models.backbones import get_backbone
from cxr.config import Experiment
from cxr.data.dataset import build_transforms, load_image
from cxr.data.layout import IMAGENET_MEAN, IMAGENET_STD
from cxr.data.layout import CLASSES
from measure import peak_memory_gib, reset_peak_memory


def seed_style_model(experiment: Experiment) -> nn.Module:
    """The notebooks' model: a torchvision network in fp32 whose head is replaced; a "frozen" backbone
    only has ``requires_grad`` off and runs in train mode with the rest (BatchNorm statistics move)."""
    spec = get_backbone(experiment.arch)
    kwargs = {"image_size": experiment.image_size} if spec.sized_at_build else {}
    model = getattr(tvm, spec.builder)(weights=None, **kwargs)
    if experiment.freeze_backbone:
        model.requires_grad_(False)
    setattr(model, spec.head, nn.Linear(spec.feature_dim, len(CLASSES)))
    return model


class NotebookDataset(Dataset):
    """The notebooks' dataset: PIL decodes the whole file and torchvision transforms it, on every access."""

    def __init__(self, split, transform) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.split.paths[index])), self.split.labels[index]


def seed_style_loaders(splits, experiment: Experiment, workers: int, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """The notebooks' training and validation DataLoaders, over :class:`NotebookDataset`."""
    size = experiment.image_size
    train = NotebookDataset(splits.train, build_transforms(size, True, True, IMAGENET_MEAN, IMAGENET_STD))
    val = NotebookDataset(splits.val, build_transforms(size, False, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    generator = torch.Generator().manual_seed(seed)
    # drop_last: a last batch of one image would stop BatchNorm in train mode at small image sizes
    return (DataLoader(train, experiment.batch_size, shuffle=True, num_workers=workers, generator=generator,
                       drop_last=len(train) > experiment.batch_size),
            DataLoader(val, experiment.batch_size, shuffle=False, num_workers=workers))


def _train_steps(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                 device: torch.device, steps: int) -> tuple[int, float]:
    """The notebooks' training loop for its first ``steps`` batches; returns the images seen and the seconds."""
    model.train()
    seen, running_loss, correct = 0, 0.0, 0
    started = time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        if step == steps:
            break
        images, labels = images.to(device), labels.to(device)
        outputs = model(images)
        loss = criterion(outputs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running_loss += loss.item() * labels.size(0)
        correct += (outputs.argmax(1) == labels).sum().item()
        seen += labels.size(0)
    return seen, time.perf_counter() - started


def _validate(model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device) -> float:
    """The notebooks' validation pass (``.item()`` every batch); returns its seconds."""
    running_loss, correct = 0.0, 0
    started = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            outputs = model(images)
            running_loss += criterion(outputs, labels).item()
            correct += (outputs.argmax(1) == labels).sum().item()
    return time.perf_counter() - started


def measure_seed_style(experiment: Experiment, splits, device: torch.device, workers: int,
                       max_steps: int | None) -> dict[str, Any]:
    """One epoch (or its first ``max_steps`` batches) of the notebook pipeline, plus its validation pass."""
    reset_peak_memory(device)
    model = seed_style_model(experiment).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=experiment.lr)
    criterion = nn.CrossEntropyLoss()
    train_loader, val_loader = seed_style_loaders(splits, experiment, workers)
    steps_per_epoch = len(train_loader)
    measured = min(steps_per_epoch, max_steps or steps_per_epoch)
    seen, train_seconds = _train_steps(model, train_loader, optimizer, criterion, device, measured)
    del train_loader  # stop its workers
    val_seconds = _validate(model, val_loader, criterion, device)
    epoch_seconds = train_seconds * steps_per_epoch / measured + val_seconds
    return {
        "images_per_second": round(len(splits.train) / epoch_seconds, 1),
        "train_images_per_second": round(seen / train_seconds, 1),
        "epoch_seconds": round(epoch_seconds, 2),
        "experiment_seconds": round(epoch_seconds * experiment.epochs, 1),
        "measured_steps": measured,
        "steps_per_epoch": steps_per_epoch,
        "extrapolated": f"{measured} of {steps_per_epoch} training steps and one validation pass measured, "
                        f"x{experiment.epochs} epochs",
        "peak_memory_gib": peak_memory_gib(device),
    }


def measure_seed_loader(splits, experiment: Experiment, workers: int, batches: int) -> dict[str, Any]:
    """The notebook DataLoader alone (PIL decode + transforms in workers), no model: its best case."""
    loader, _ = seed_style_loaders(splits, experiment, workers)
    seen, started = 0, time.perf_counter()
    for step, (_, labels) in enumerate(loader):
        seen += len(labels)
        if step + 1 == batches:
            break
    seconds = time.perf_counter() - started
    return {"images_per_second": round(seen / seconds, 1), "images": seen, "workers": workers}


def seed_limit(seed: dict[str, Any], seed_loader: dict[str, Any] | None) -> str:
    """What limits the seed-style pipeline: host decoding when its DataLoader alone is barely faster."""
    if seed_loader and seed_loader["images_per_second"] < 1.25 * seed["train_images_per_second"]:
        return (f"host decode: PIL in {seed_loader['workers']} workers delivers "
                f"{seed_loader['images_per_second']:,.0f} img/s with no model at all")
    return "device compute (fp32)"
