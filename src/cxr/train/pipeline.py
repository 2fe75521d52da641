"""The data pipeline a run trains on, built once before the first epoch: the decoded (or cached) splits,
their loaders, a frozen random backbone's BatchNorm statistics, a frozen backbone's cached features and the
module each split is fed to (the model, its head alone, or the model behind CUDA graphs)."""

from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from cxr.common.progress import tqdm

from cxr.common import distributed
from cxr.data.augment import BatchTransform, DeviceDataset, DeviceLoader, EvalTransform, TrainAugment
from cxr.data.cache import cache_split
from cxr.data.imageio import cache_side
from cxr.config import Experiment
from cxr.data.dataset import DataSplits, Split, XRayDataset, warn_skipped
from cxr.train.features import FrozenBackboneBatches, feature_dataset
from cxr.train.graphs import GraphedTraining
from cxr.models.classifier import Classifier, estimate_batchnorm_statistics, needs_batchnorm_statistics
from cxr.common.runtime import Runtime
from cxr.common.timing import PhaseTimer, no_timing


@dataclass
class DataPipeline:
    """What the model reads while it trains: the training and validation sets (images, or a frozen
    backbone's cached features) and the module each is fed to (the whole model, or the head alone).
    ``frozen_backbone``: the backbone that turns training images into the head's inputs every epoch
    (a frozen backbone whose training images are augmented), else None."""

    train_set: Dataset | DeviceDataset
    val_set: Dataset | DeviceDataset
    train_labels: list[int]
    train_module: nn.Module
    val_module: nn.Module
    info: dict[str, Any]
    frozen_backbone: nn.Module | None = None


def build_pipeline(experiment: Experiment, splits: DataSplits, model: Classifier, prep: dict[str, Any],
                   runtime: Runtime, seed: int, phase_timer: PhaseTimer = no_timing) -> DataPipeline:
    """Decode (or read from the cache) the training and validation splits, estimate a frozen random
    backbone's BatchNorm statistics, and replace un-augmented splits of a frozen backbone by its
    features (:mod:`cxr.train.features`). ``info`` says what was done, for metrics.json."""
    with distributed.main_first():  # one process per node decodes into the image cache, the others read it
        train_set, train_split, train_info = build_dataset(splits.train, experiment, prep, runtime, True, "decode train")
        val_set, val_split, val_info = build_dataset(splits.val, experiment, prep, runtime, False, "decode val")
    warn_skipped(train_split.skipped + val_split.skipped)
    batchnorm_images = 0
    if needs_batchnorm_statistics(model, experiment.weights):
        with phase_timer("BatchNorm statistics"):
            batchnorm_images = _estimate_batchnorm(model, experiment, train_set, len(train_split), runtime, seed)
    train_module = val_module = model
    frozen_backbone = None
    feature_cache, started = "off", time.perf_counter()
    if model.freeze_backbone and runtime.feature_cache:
        val_set, val_module, feature_cache = _features_of(model, val_set, experiment.batch_size, runtime,
                                                          "val features"), model.head, "val"
        if not experiment.augment:
            train_set, train_module, feature_cache = _features_of(model, train_set, experiment.batch_size, runtime,
                                                                  "train features"), model.head, "train+val"
    if model.freeze_backbone and train_module is model:
        train_module, frozen_backbone = model.head, model.backbone
    info = {
        **runtime.describe(),
        "cache_side": train_info.get("cache_side"),
        "images_decoded": train_info.get("decoded", 0) + val_info.get("decoded", 0) if runtime.cache else "every epoch",
        "cache_seconds": round(train_info.get("cache_seconds", 0.0) + val_info.get("cache_seconds", 0.0), 3),
        "data_on": train_info["held_on"],
        "augment_on": (runtime.device.type if runtime.cache else "cpu (DataLoader workers)") if experiment.augment else None,
        "feature_cache": feature_cache,
        "feature_seconds": round(time.perf_counter() - started, 3),
        "processes": distributed.world_size(),
        "batchnorm_statistics": f"estimated from {batchnorm_images} training images" if batchnorm_images else "as built",
        "frozen_forward_batch": frozen_forward_batch(experiment.batch_size, runtime) if frozen_backbone else None,
    }
    return DataPipeline(train_set, val_set, train_split.labels, train_module, val_module, info, frozen_backbone)


def training_batches(pipeline: DataPipeline, step_batch: int, runtime: Runtime, seed: int, shard: bool = True,
                     ) -> DataLoader | DeviceLoader | FrozenBackboneBatches:
    """One epoch's training batches in the seeded order: images, or a frozen backbone's features of them."""
    if pipeline.frozen_backbone is None:
        return make_loader(pipeline.train_set, step_batch, True, runtime, seed, shard=shard)
    loader = make_loader(pipeline.train_set, frozen_forward_batch(step_batch, runtime), True, runtime, seed, shard=shard)
    return FrozenBackboneBatches(pipeline.frozen_backbone, loader, runtime, step_batch)


# Training images a frozen random backbone's BatchNorm statistics are estimated from (models.needs_batchnorm_statistics).
BATCHNORM_IMAGES = 512


def make_loader(
    dataset: Dataset | DeviceDataset, batch_size: int, shuffle: bool, runtime: Runtime, seed: int = 0,
    shard: bool = False,
) -> DataLoader | DeviceLoader:
    """A loader that keeps every sample (no ``drop_last``) and whose order (and, for a
    :class:`DeviceDataset`, augmentation) follows ``seed``. A DeviceDataset is sliced where it lives:
    no workers, no collation, no copies. The order is a ``DistributedSampler``'s permutation in
    every case; with ``shard`` in a torchrun job the loader yields only this rank's part of it
    (``perm[rank::world]``, padded to equal parts), and :func:`cxr.train.engine.predict` gathers the parts again."""
    rank, world = (distributed.rank(), distributed.world_size()) if shard else (0, 1)
    if isinstance(dataset, DeviceDataset):
        return DeviceLoader(dataset, batch_size, shuffle, runtime, seed, rank, world)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed),
        num_workers=runtime.workers,
        pin_memory=runtime.pin_memory,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(distributed.rank_seed(seed, rank)),  # seeds the workers' augmentation
    )


def build_dataset(
    split: Split, experiment: Experiment, prep: dict[str, Any], runtime: Runtime, train: bool,
    description: str = "decode", transform: BatchTransform | None = None,
) -> tuple[Dataset | DeviceDataset, Split, dict[str, Any]]:
    """One split as ``fit`` and ``workflow.evaluate_model`` read it.

    With ``runtime.cache`` every image is decoded once into the on-disk cache (:mod:`cxr.data.cache`), the
    whole uint8 split is held where ``runtime`` keeps data and transformed on the device per batch
    (:mod:`cxr.data.augment`); without it every image is decoded and transformed on every access, in
    DataLoader workers. Returns the dataset, the split it holds (the cache leaves out files that fail to
    decode, listed in ``skipped``) and what it cost, for metrics.json. Both read the same decoded squares
    and apply the same tensor ``transform`` (default: training augmentation or the evaluation crop).
    """
    augment = train and experiment.augment
    mean, std = tuple(prep["mean"]), tuple(prep["std"])
    resize = prep.get("resize") or round(experiment.image_size * 256 / 224)  # checkpoints may predate "resize"
    channels_last = runtime.channels_last and runtime.cache  # DataLoader workers collate contiguous batches
    transform = transform or (TrainAugment(experiment.image_size, mean, std, channels_last=channels_last) if augment
                              else EvalTransform(experiment.image_size, resize, mean, std, channels_last=channels_last))
    side = cache_side(experiment.image_size, resize)
    if not runtime.cache:
        return XRayDataset(split, transform, side), split, {"held_on": "disk (decoded every epoch)"}
    cached = cache_split(split, side, runtime.cache_dir, progress=runtime.progress, description=description)
    if cached.write_error:
        warnings.warn(cached.write_error, stacklevel=2)
    dataset = DeviceDataset.from_images(cached.images, cached.split.labels, runtime, transform)
    return dataset, cached.split, {"held_on": dataset.held_on, "cache_side": cached.side,
                                   "decoded": cached.decoded, "cache_seconds": cached.seconds}


def gather_shards(loader: DataLoader | DeviceLoader, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample results of a loader sharded over the ranks, gathered in dataset order on every rank
    (returned unchanged for a loader over the whole split)."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.num_replicas == 1:
        return list(tensors)
    return [distributed.gather_in_order(tensor, len(sampler.dataset)) for tensor in tensors]


def frozen_forward_batch(step_batch: int, runtime: Runtime) -> int:
    """How many images a frozen backbone turns into features at once while the head steps on ``step_batch``:
    the largest multiple of ``step_batch`` up to ``runtime.frozen_forward_batch`` (at least ``step_batch``)."""
    return step_batch * max(1, runtime.frozen_forward_batch // step_batch)


def training_module(model: Classifier, step_batch: int, runtime: Runtime) -> nn.Module:
    """What the training steps call: the model itself, or for a fully trained network with
    ``runtime.cuda_graphs`` in one process, the model behind CUDA graphs (:mod:`cxr.train.graphs`)."""
    if runtime.cuda_graphs and not runtime.compile and not model.freeze_backbone and not distributed.is_distributed():
        return GraphedTraining(model, step_batch)
    return model


def _features_of(model: Classifier, dataset: Dataset | DeviceDataset, batch_size: int, runtime: Runtime,
                 description: str) -> DeviceDataset:
    """The backbone's features of a whole split; in a torchrun job each rank computes its shard."""
    loader = make_loader(dataset, batch_size, False, runtime, shard=True)
    with runtime.one_off():
        shard = feature_dataset(model.backbone, loader, runtime, description)
    return DeviceDataset(*gather_shards(loader, shard.inputs, shard.labels))


def _estimate_batchnorm(model: Classifier, experiment: Experiment, train_set: Dataset | DeviceDataset,
                        train_size: int, runtime: Runtime, seed: int) -> int:
    """BatchNorm statistics of a frozen random backbone from the first training batches; returns how many
    images they came from. The same seeded batches on every rank, so every rank gets the same statistics."""
    loader = make_loader(train_set, experiment.batch_size, True, runtime, seed=seed)
    steps = min(len(loader), math.ceil(BATCHNORM_IMAGES / experiment.batch_size))
    batches = tqdm(itertools.islice(loader, steps), "BatchNorm statistics", total=steps, leave=False,
                   disable=not runtime.progress)
    batches = (batch for batch in batches if len(batch[1]) > 1)  # BatchNorm cannot average a single 1x1 map
    with runtime.one_off(), runtime.autocast():
        estimate_batchnorm_statistics(model.backbone, batches, runtime.device)
    return min(train_size, steps * experiment.batch_size)
