"""Training and evaluation: ``train_one_epoch``, ``evaluate`` and ``fit``, shared by all experiments."""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import Experiment
from .augment import BatchTransform, DeviceDataset, DeviceLoader, EvalTransform, TrainAugment
from .cache import cache_side, cache_split, default_cache_dir
from .data import CLASSES, EXPECTED_LAYOUT, DatasetError, DataSplits, Split, XRayDataset, warn_skipped
from .features import feature_dataset
from .models import Classifier, build_model, estimate_batchnorm_statistics, needs_batchnorm_statistics, preprocessing


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, mismatched data); the message says what was kept."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C during training; the last complete epoch is saved and can be resumed."""

    def __init__(self, message: str, saved_epochs: int = 0) -> None:
        super().__init__(message)
        self.saved_epochs = saved_epochs


def select_device(name: str | None = None) -> torch.device:
    """The requested device, or the best available one: cuda, then mps, then cpu."""
    if name and name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA GPU is available")
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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only: bf16 where supported (no loss scaling needed), else fp16."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_deterministic() -> None:
    """Bit-identical repeated runs on one machine, at some speed cost: deterministic kernels only (an op
    without one raises), no cuDNN autotuning, and the fixed cuBLAS workspace CUDA needs for it (read when
    cuBLAS starts, so call this before the first GPU matmul). Process-wide, like the settings it changes."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def epoch_seed(seed: int, epoch: int) -> int:
    """RNG seed for one epoch: data order and augmentation depend only on (seed, epoch), so a resumed
    run draws exactly what an uninterrupted run would have drawn."""
    return seed * 1000 + epoch


# Training images a frozen random backbone's BatchNorm statistics are estimated from (models.needs_batchnorm_statistics).
BATCHNORM_IMAGES = 512


def make_loader(
    dataset: Dataset | DeviceDataset, batch_size: int, shuffle: bool, device: torch.device, workers: int, seed: int = 0,
    shard: bool = False,
) -> DataLoader | DeviceLoader:
    """A loader that keeps every sample (no ``drop_last``) and whose order (and, for a
    :class:`DeviceDataset`, augmentation) follows ``seed``. A DeviceDataset is sliced where it lives:
    no workers, no collation, no copies. The order is a ``DistributedSampler``'s permutation in
    every case; with ``shard`` in a torchrun job the loader yields only this rank's part of it
    (``perm[rank::world]``, padded to equal parts), and :func:`predict` gathers the parts again."""
    rank, world = (distributed.rank(), distributed.world_size()) if shard else (0, 1)
    if isinstance(dataset, DeviceDataset):
        return DeviceLoader(dataset, batch_size, shuffle, device, seed, rank, world)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator().manual_seed(distributed.rank_seed(seed, rank)),  # seeds the workers' augmentation
    )


def build_dataset(
    split: Split, experiment: Experiment, prep: dict[str, Any], device: torch.device, train: bool,
    cache_dir: str | os.PathLike | None = None, progress: bool = True, description: str = "decode",
    transform: BatchTransform | None = None,
) -> tuple[Dataset | DeviceDataset, Split, dict[str, Any]]:
    """One split as ``fit`` and ``workflow.evaluate_model`` read it.

    With ``experiment.cache`` every image is decoded once into the on-disk cache (:mod:`cxr.cache`), the
    whole uint8 split is held on ``device`` and transformed there per batch (:mod:`cxr.augment`);
    without it every image is decoded and transformed on every access, in DataLoader workers. Returns
    the dataset, the split it holds (the cache leaves out files that fail to decode, listed in
    ``skipped``) and what it cost, for metrics.json. Both read the same decoded squares and apply the
    same tensor ``transform`` (default: training augmentation or the evaluation crop).
    """
    augment = train and experiment.augment
    mean, std = tuple(prep["mean"]), tuple(prep["std"])
    resize = prep.get("resize") or round(experiment.image_size * 256 / 224)  # checkpoints may predate "resize"
    transform = transform or (TrainAugment(experiment.image_size, mean, std) if augment
                              else EvalTransform(experiment.image_size, resize, mean, std))
    side = cache_side(experiment.image_size, resize)
    if not experiment.cache:
        return XRayDataset(split, transform, side), split, {"held_on": "disk (decoded every epoch)"}
    cached = cache_split(split, side, cache_dir, progress=progress, description=description)
    if cached.write_error:
        warnings.warn(cached.write_error, stacklevel=2)
    dataset = DeviceDataset.from_images(cached.images, cached.split.labels, device, transform)
    return dataset, cached.split, {"held_on": dataset.inputs.device.type, "cache_side": cached.side,
                                   "decoded": cached.decoded, "cache_seconds": cached.seconds}


def class_weights(labels: list[int], num_classes: int = len(CLASSES)) -> torch.Tensor:
    """Inverse-frequency weights from the training split (sklearn's 'balanced'), never hard-coded."""
    present = np.unique(labels)
    weights = np.ones(num_classes, dtype=np.float32)
    weights[present] = compute_class_weight("balanced", classes=present, y=np.asarray(labels))
    return torch.tensor(weights, dtype=torch.float32)


def build_optimizer(model: Classifier, experiment: Experiment, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only: the head at ``lr``, a trained backbone at ``backbone_lr``."""
    groups = [{"params": list(model.head.parameters()), "lr": experiment.lr}]
    if not model.freeze_backbone:
        groups.append({"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": experiment.backbone_lr})
    return torch.optim.AdamW(groups, weight_decay=experiment.weight_decay, fused=device.type == "cuda")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to zero, stepped once per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device):
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    return images, labels.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    description: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """One pass over ``loader``. Loss and accuracy are summed on the device: one sync per epoch (in a
    torchrun job they are summed over the ranks too, so every rank reports the same numbers)."""
    model.train()
    # BatchNorm in training mode cannot normalise a single image; a last batch of one is left out instead
    # of crashing the epoch (every rank of a torchrun job gets batches of the same size, so all skip it).
    batchnorm_trains = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for images, labels in tqdm(loader, desc=description, leave=False, disable=not progress):
        if batchnorm_trains and labels.numel() == 1:
            continue
        images, labels = _to_device(images, labels, device)
        with autocast(device, amp_dtype):
            logits = model(images)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.argmax(1) == labels).sum()
        seen += labels.numel()
    loss_sum, correct, seen = distributed.sum_across_ranks(loss_sum, correct, torch.tensor(seen, device=device))
    return {"loss": loss_sum.item() / seen.item(), "accuracy": correct.item() / seen.item()}


@torch.inference_mode()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None = None,
    description: str = "eval", progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and labels for every sample of ``loader``, in order. For a loader sharded
    over a torchrun job (``make_loader(..., shard=True)``) every rank predicts its part and gets the
    whole split back, in order."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, desc=description, leave=False, disable=not progress):
        images, labels = _to_device(images, labels, device)
        with autocast(device, amp_dtype):
            all_logits.append(model(images).float())
        all_labels.append(labels)
    logits, labels = gather_shards(loader, torch.cat(all_logits), torch.cat(all_labels))
    return logits.cpu().numpy(), labels.cpu().numpy()


def gather_shards(loader: DataLoader | DeviceLoader, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample results of a loader sharded over the ranks, gathered in dataset order on every rank
    (returned unchanged for a loader over the whole split)."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.num_replicas == 1:
        return list(tensors)
    return [distributed.gather_in_order(tensor, len(sampler.dataset)) for tensor in tensors]


def summarize(logits: np.ndarray, labels: np.ndarray, criterion: nn.Module | None = None) -> dict[str, float]:
    """Loss, accuracy, macro-F1 and balanced accuracy of a set of predictions."""
    predictions = logits.argmax(1)
    result = {
        "accuracy": float((predictions == labels).mean()),
        "macro_f1": float(f1_score(labels, predictions, average="macro", labels=range(logits.shape[1]), zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
    }
    if criterion is not None:
        result["loss"] = float(criterion(torch.from_numpy(logits), torch.from_numpy(labels).long()))
    return result


def evaluate(
    model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device,
    amp_dtype: torch.dtype | None = None, description: str = "eval", progress: bool = True,
) -> dict[str, float]:
    logits, labels = predict(model, loader, device, amp_dtype, description, progress)
    return summarize(logits, labels, criterion.cpu())


@dataclass
class FitResult:
    """What ``fit`` leaves behind: the trained model (best weights loaded) and where things were written."""

    model: Classifier
    history: list[dict[str, float]]
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    stopped_early: bool
    train_seconds: float
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)


def _better(monitor: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


def _write_history(history: list[dict[str, float]], path: Path) -> None:
    if history:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)


def require_every_class(splits: DataSplits) -> None:
    """Refuse, before any training, data that does not hold every class of the experiment: a class
    without training or validation images would be learned from nothing and scored as zero."""
    for name, split in (("train", splits.train), ("val", splits.val)):
        empty = [c for c, n in split.counts().items() if n == 0]
        if empty:
            raise DatasetError(
                f"The {name} split in {str(splits.root)!r} has no usable images of {', '.join(empty)}; "
                f"every class of {', '.join(CLASSES)} needs some. {EXPECTED_LAYOUT}"
            )


def data_signature(splits: DataSplits) -> dict[str, Any]:
    """What a resumed run must see again: the same split sizes per class and the same validation source."""
    return {"val_source": splits.val_source, "counts": splits.counts()}


def check_resumable(state: dict[str, Any], path: Path, experiment: Experiment, seed: int, splits: DataSplits) -> None:
    """Refuse to resume from a checkpoint written with other settings, seed or data: the continued run
    would silently differ from the one that was interrupted."""
    saved = {**state["experiment"], **{key: state[key] for key in ("seed", "data") if key in state}}
    wanted = {**experiment.to_dict(), "seed": seed, "data": data_signature(splits)}
    differences = [f"{key}={saved[key]!r} (now {wanted[key]!r})" for key in wanted
                   if key in saved and saved[key] != wanted[key]]
    if differences:
        raise CheckpointError(
            f"{str(path)!r} was written with other settings: {'; '.join(differences)}. "
            "Resume with the same options (experiment flags, --seed, --data-dir, --val-source) as the interrupted run."
        )


def fit(
    experiment: Experiment,
    splits: DataSplits,
    out_dir: Path,
    device: torch.device | None = None,
    seed: int = 42,
    workers: int | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[list[dict[str, float]]], None] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> FitResult:
    """Train ``experiment`` on ``splits``, selecting the best epoch and stopping early on the
    validation metric; write ``checkpoints/{last,best}.pt`` and ``history.csv`` under ``out_dir``.
    ``cache_dir`` holds the decoded-image cache (default ``cache.default_cache_dir()``); how the data
    reached the model is in ``FitResult.extra["pipeline"]``.

    In a torchrun job (:mod:`cxr.distributed`) every rank calls ``fit``: ``experiment.batch_size`` is
    the global batch, each rank trains on its share of every batch, validation predictions are
    gathered, and only rank 0 writes files and shows progress."""
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    require_every_class(splits)
    batch_per_rank = distributed.per_rank_batch(experiment.batch_size)
    progress = progress and distributed.is_main()
    if resume and not last_path.exists():
        raise CheckpointError(f"--resume was given but {str(last_path)!r} does not exist.")
    device = distributed.setup(device or select_device())  # under torchrun: this rank's GPU
    workers = (min(8, os.cpu_count() or 1) if device.type == "cuda" else 0) if workers is None else workers
    seed_everything(seed)

    model = build_model(experiment.arch, len(CLASSES), experiment.weights, experiment.freeze_backbone, experiment.image_size)
    model = model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    prep = preprocessing(experiment.arch, experiment.image_size)
    amp_dtype = autocast_dtype(device)
    if device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
    with distributed.main_first():  # one process per node decodes into the image cache, the others read it
        train_set, train_split, train_info = build_dataset(splits.train, experiment, prep, device, True, cache_dir,
                                                           progress, "decode train")
        val_set, val_split, val_info = build_dataset(splits.val, experiment, prep, device, False, cache_dir,
                                                     progress, "decode val")
    warn_skipped(train_split.skipped + val_split.skipped)
    batchnorm_images = 0
    if needs_batchnorm_statistics(model, experiment.weights):
        # The same seeded batches on every rank (not this rank's shard), so every rank gets the same statistics.
        loader = make_loader(train_set, experiment.batch_size, True, device, workers, seed=seed)
        steps = min(len(loader), math.ceil(BATCHNORM_IMAGES / experiment.batch_size))
        batchnorm_images = min(len(train_split.labels), steps * experiment.batch_size)
        batches = tqdm(itertools.islice(loader, steps), "BatchNorm statistics", total=steps, leave=False,
                       disable=not progress)
        estimate_batchnorm_statistics(model.backbone, batches, device)
    train_module = val_module = model
    feature_cache, feature_seconds = "off", 0.0

    def features_of(dataset: Dataset | DeviceDataset, description: str) -> DeviceDataset:
        """The backbone's features of a whole split; in a torchrun job each rank computes its shard."""
        loader = make_loader(dataset, experiment.batch_size, False, device, workers, shard=True)
        shard = feature_dataset(model.backbone, loader, device, amp_dtype, description, progress)
        return DeviceDataset(*gather_shards(loader, shard.inputs, shard.labels))

    if model.freeze_backbone and experiment.feature_cache == "auto":
        started = time.perf_counter()
        val_set = features_of(val_set, "val features")
        val_module, feature_cache = model.head, "val"
        if not experiment.augment:
            train_set = features_of(train_set, "train features")
            train_module, feature_cache = model.head, "train+val"
        feature_seconds = time.perf_counter() - started
    if experiment.compile:
        model.compile()
    train_module = distributed.wrap(train_module, device, model.freeze_backbone)
    val_loader = make_loader(val_set, experiment.batch_size, False, device, workers, shard=True)
    pipeline = {
        "cache": experiment.cache,
        "cache_dir": str(Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) if experiment.cache else None,
        "cache_side": train_info.get("cache_side"),
        "images_decoded": train_info.get("decoded", 0) + val_info.get("decoded", 0) if experiment.cache else "every epoch",
        "cache_seconds": round(train_info.get("cache_seconds", 0.0) + val_info.get("cache_seconds", 0.0), 3),
        "data_on": train_info["held_on"],
        "augment_on": (device.type if experiment.cache else "cpu (DataLoader workers)") if experiment.augment else None,
        "feature_cache": feature_cache,
        "feature_seconds": round(feature_seconds, 3),
        "compile": experiment.compile,
        "channels_last": device.type == "cuda",
        "mixed_precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
        "processes": distributed.world_size(),
        "batchnorm_statistics": f"estimated from {batchnorm_images} training images" if batchnorm_images else "as built",
    }

    weights = class_weights(train_split.labels)
    criterion = nn.CrossEntropyLoss(weight=weights.to(device), label_smoothing=experiment.label_smoothing)
    val_criterion = nn.CrossEntropyLoss(weight=weights)
    optimizer = build_optimizer(model, experiment, device)
    steps_per_epoch = len(make_loader(train_set, batch_per_rank, True, device, workers, shard=True))
    scheduler = warmup_cosine(optimizer, experiment.epochs * steps_per_epoch, experiment.warmup_epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    history: list[dict[str, float]] = []
    best_value, best_epoch, bad_epochs, start_epoch, train_seconds = None, 0, 0, 0, 0.0
    if resume:
        state = load_checkpoint(last_path, experiment=experiment.name, arch=experiment.arch, classes=CLASSES)
        check_resumable(state, last_path, experiment, seed, splits)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, start_epoch = state["history"], state["epoch"]
        best_value, best_epoch, bad_epochs = state["best_value"], state["best_epoch"], state["bad_epochs"]
        train_seconds = state["train_seconds"]

    def checkpoint_state(epoch: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch,
            "experiment": experiment.to_dict(),
            "classes": list(CLASSES),
            "preprocessing": prep,
            "history": history,
            "best_value": best_value,
            "best_epoch": best_epoch,
            "bad_epochs": bad_epochs,
            "seed": seed,
            "data": data_signature(splits),
            "train_seconds": train_seconds,
        }

    stopped_early, saved_epochs = False, start_epoch
    epochs = tqdm(range(start_epoch, experiment.epochs), desc=experiment.name, initial=start_epoch,
                  total=experiment.epochs, disable=not progress)
    try:  # Ctrl-C anywhere in the loop (a batch, a save, the callback) ends in the same resumable state
        for epoch in epochs:
            if experiment.patience and bad_epochs >= experiment.patience:
                stopped_early = True
                break
            started = time.perf_counter()
            seed_everything(distributed.rank_seed(epoch_seed(seed, epoch)))
            train_loader = make_loader(train_set, batch_per_rank, True, device, workers, epoch_seed(seed, epoch),
                                       shard=True)
            train = train_one_epoch(train_module, train_loader, criterion, optimizer, scheduler, device, amp_dtype,
                                    scaler, f"epoch {epoch + 1}", progress)
            val = evaluate(val_module, val_loader, val_criterion, device, amp_dtype, "val", progress)
            seconds = time.perf_counter() - started
            if not math.isfinite(train["loss"]):
                kept = (f"the last good checkpoint (epoch {saved_epochs}) is {str(last_path)!r}" if saved_epochs
                        else "no checkpoint was written")
                raise TrainingError(
                    f"Training loss became {train['loss']} in epoch {epoch + 1}; {kept}. Try a lower --lr."
                )
            train_seconds += seconds
            row = {
                "epoch": epoch + 1,
                "train_loss": train["loss"],
                "train_accuracy": train["accuracy"],
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
                "val_macro_f1": val["macro_f1"],
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": seconds,
            }
            history.append(row)
            if _better(experiment.monitor, row[experiment.monitor], best_value):
                best_value, best_epoch, bad_epochs = row[experiment.monitor], epoch + 1, 0
                if distributed.is_main():
                    save_checkpoint(checkpoint_state(epoch + 1), best_path)
            else:
                bad_epochs += 1
            if distributed.is_main():  # every rank holds the same weights, history and early-stopping state
                save_checkpoint(checkpoint_state(epoch + 1), last_path)
            saved_epochs = epoch + 1
            if distributed.is_main():
                _write_history(history, out_dir / "history.csv")
                epochs.set_postfix(val_f1=f"{row['val_macro_f1']:.3f}", val_loss=f"{row['val_loss']:.3f}")
                if on_epoch_end is not None:
                    on_epoch_end(history)
        distributed.barrier()  # rank 0 has written best.pt; every rank reads it
        best = load_checkpoint(best_path, experiment=experiment.name)
    except KeyboardInterrupt:
        epochs.close()
        done = "epoch 1" if saved_epochs == 1 else f"epochs 1-{saved_epochs}"
        saved = (f"{done} of {experiment.epochs} saved in {str(last_path)!r}; to continue, run the same "
                 "command again with --resume (from Python: resume=True)" if saved_epochs
                 else "no epoch was finished, so there is nothing to resume")
        raise TrainingInterrupted(f"Training interrupted: {saved}.", saved_epochs) from None
    model.load_state_dict(best["model"])
    return FitResult(model, history, best_path, last_path, best_epoch, stopped_early, train_seconds, device,
                     {"pipeline": pipeline})
