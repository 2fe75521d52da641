"""Training: :func:`fit` runs the epochs of one experiment (train, validate, record, checkpoint, stop early),
shared by all experiments. Read top to bottom: ``fit``, what it builds first (:func:`start_run`,
:func:`prepare_training`), what each epoch calls (:class:`EpochRunner`, :class:`RunFiles`,
:class:`TrainingState`), then the training step, evaluation and the checks. The data it trains on is
built by :mod:`cxr.train.pipeline`; how long each phase takes is told to a :mod:`cxr.common.timing` hook."""

from __future__ import annotations

import csv
import hashlib
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
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import DataLoader
from cxr.common.progress import tqdm

from cxr.common import distributed
from cxr.evaluate import metrics
from cxr.data.augment import DeviceLoader
from cxr.models.checkpoint import CheckpointError, CheckpointWriter, load_checkpoint, remove_stale_temporaries
from cxr.config import Experiment
from cxr.data.dataset import DataSplits, Split
from cxr.data.layout import EXPECTED_LAYOUT, DatasetError
from cxr.data.layout import CLASSES
from cxr.common.fileid import content_digest, text_bytes
from cxr.train.graphs import GraphedTraining
from cxr.train.losses import build_loss
from cxr.models.classifier import Classifier, build_model, preprocessing
from cxr.train.optim import build_optimizer, build_schedule
from cxr.train.pipeline import DataPipeline, build_pipeline, gather_shards, make_loader, training_batches, training_module
from cxr.common.runtime import Runtime
from cxr.common.timing import PhaseTimer, no_timing


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, mismatched data); the message says what was kept."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C during training; the last complete epoch is saved and can be resumed."""

    def __init__(self, message: str, saved_epochs: int = 0) -> None:
        super().__init__(message)
        self.saved_epochs = saved_epochs


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
    runtime: Runtime
    extra: dict[str, Any] = field(default_factory=dict)


def fit(
    experiment: Experiment,
    splits: DataSplits,
    out_dir: Path,
    runtime: Runtime | None = None,
    seed: int = 42,
    resume: bool = False,
    on_epoch_end: Callable[[list[dict[str, float]]], None] | None = None,
    model: Classifier | None = None,
    phase_timer: PhaseTimer = no_timing,
) -> FitResult:
    """Train ``experiment`` on ``splits``, selecting the best epoch and stopping early on the
    validation metric; write ``checkpoints/{last,best}.pt`` and ``history.csv`` under ``out_dir``.
    ``model``, when given, is trained (moved to the device) instead of a newly built one.
    ``runtime`` says how (default: :meth:`Runtime.create` on the best device); what the run used is in
    ``FitResult.extra["pipeline"]``. ``phase_timer`` is told when each phase runs (:mod:`cxr.common.timing`).

    In a torchrun job (:mod:`cxr.common.distributed`) every rank calls ``fit``: ``experiment.batch_size`` is
    the global batch, each rank trains on its share of every batch, validation predictions are
    gathered, and only rank 0 writes files and shows progress."""
    resume_from = RunFiles.last_of(out_dir) if resume else None
    runtime = start_run(splits, runtime, seed, resume_from)
    model, prep, pipeline, state = prepare_training(experiment, splits, runtime, seed, resume_from, model, phase_timer)
    files = RunFiles.open(Path(out_dir), experiment, prep, seed, splits, state, resumed=resume)
    run, stopped_early = EpochRunner(experiment, pipeline, runtime, seed), False
    try:  # Ctrl-C anywhere in the loop (a batch, a save, the callback) ends in the same resumable state
        with tqdm(range(state.epochs_done, experiment.epochs), desc=experiment.name, initial=state.epochs_done,
                  total=experiment.epochs, disable=not runtime.progress) as epochs:
            for epoch in epochs:
                if experiment.patience and state.bad_epochs >= experiment.patience:
                    stopped_early = True
                    break
                started = time.perf_counter()
                with phase_timer("train"):
                    train = run.train(epoch, state)
                with phase_timer("validate"):
                    val = run.validate()
                row = history_row(epoch, train, val, state.lr, time.perf_counter() - started)
                is_best = state.record(row, experiment.monitor)
                with phase_timer("checkpoint save"):
                    files.save(state, is_best)
                epochs.set_postfix(val_f1=f"{row['val_macro_f1']:.3f}", val_loss=f"{row['val_loss']:.3f}")
                if on_epoch_end is not None and distributed.is_main():
                    on_epoch_end(state.history)
        best_weights = files.best_weights_once_written(phase_timer)
    except KeyboardInterrupt:
        files.writer.wait()  # the epoch handed to the writer is on disk before we say it is
        raise _interrupted(experiment, files.saved_epochs, files.last) from None
    except TrainingError as error:
        files.writer.wait()
        raise _failed(error, files.saved_epochs, files.last) from None
    model.load_state_dict(best_weights)
    return FitResult(model, state.history, files.best, files.last, state.best_epoch, stopped_early,
                     state.train_seconds, runtime, {"pipeline": pipeline.info})


def start_run(splits: DataSplits, runtime: Runtime | None, seed: int, resume_from: Path | None) -> Runtime:
    """Check what can be checked before anything is built (every class present, a checkpoint to resume
    from), join the torchrun job if any (this rank's GPU; progress on rank 0 only), apply the runtime's
    backend settings and seed. Returns the runtime the run uses."""
    require_every_class(splits)
    if resume_from is not None and not resume_from.exists():
        raise CheckpointError(f"--resume was given but {str(resume_from)!r} does not exist.")
    runtime = runtime or Runtime.create()
    runtime = runtime.replace(device=distributed.setup(runtime.device),  # under torchrun: this rank's GPU
                              progress=runtime.progress and distributed.is_main())
    runtime.apply_backend_settings()
    seed_everything(seed)
    return runtime


def prepare_training(experiment: Experiment, splits: DataSplits, runtime: Runtime, seed: int,
                     resume_from: Path | None, model: Classifier | None = None,
                     phase_timer: PhaseTimer = no_timing,
                     ) -> tuple[Classifier, dict[str, Any], DataPipeline, TrainingState]:
    """Everything the epochs need, built in the order it depends on: the model on the device (``model``
    when given, else a new one), its preprocessing, the data pipeline, the module a training step runs
    (compiled, graphed or wrapped for torchrun, as ``runtime`` says) and the optimisation state, restored
    from ``resume_from`` if given."""
    if model is None:
        with phase_timer("model build"), runtime.device:  # initialised where it lives (seconds on a CPU for ResNet152)
            model = build_model(experiment.arch, len(CLASSES), experiment.weights, experiment.trainable_blocks,
                                experiment.image_size)
    else:
        check_model_fits(model, experiment)
    model = runtime.prepare_model(model)
    prep = preprocessing(experiment.arch, experiment.image_size)
    pipeline = build_pipeline(experiment, splits, model, prep, runtime, seed, phase_timer)
    if runtime.compile:  # the backbone alone: a frozen one is called without the Classifier while training
        model.backbone.compile()
    step_batch = distributed.per_rank_batch(experiment.batch_size)
    if pipeline.train_module is model:
        pipeline.train_module = training_module(model, step_batch, runtime)
    pipeline.info["cuda_graphs"] = isinstance(pipeline.train_module, GraphedTraining)  # used, not just allowed
    pipeline.train_module = distributed.wrap(pipeline.train_module, runtime.device, model.trainable_blocks)
    steps_per_epoch = len(training_batches(pipeline, step_batch, runtime, seed))
    state = build_training_state(model, experiment, runtime, steps_per_epoch)
    if resume_from is not None:
        saved = load_checkpoint(resume_from, experiment=experiment.name, arch=experiment.arch, classes=CLASSES)
        check_resumable(saved, resume_from, experiment, seed, splits)
        state.restore(saved)
    return model, prep, pipeline, state


def check_model_fits(model: Classifier, experiment: Experiment) -> None:
    """Refuse a given model that is not the experiment's (architecture, trained blocks, classes, ViT
    image size): it would train, and be saved as the experiment, with another configuration."""
    wanted = {"arch": experiment.arch, "trainable_blocks": experiment.trainable_blocks, "classes": len(CLASSES)}
    found = {"arch": model.arch, "trainable_blocks": model.trainable_blocks, "classes": model.head.out_features}
    if hasattr(model.backbone, "image_size"):  # a ViT's position embeddings fix its image size
        wanted["image_size"], found["image_size"] = experiment.image_size, model.backbone.image_size
    differences = [f"{key}={found[key]!r} (the experiment has {wanted[key]!r})" for key in wanted
                   if found[key] != wanted[key]]
    if differences:
        raise TrainingError(f"The model given does not fit {experiment.name}: {'; '.join(differences)}.")


@dataclass
class EpochRunner:
    """The two halves of an epoch, training and validation, with what every epoch shares (the losses,
    the validation loader)."""

    experiment: Experiment
    pipeline: DataPipeline
    runtime: Runtime
    seed: int

    def __post_init__(self) -> None:
        self.criterion = training_loss(self.pipeline.train_labels, self.experiment, self.runtime.device)
        self.val_criterion = validation_loss(self.pipeline.train_labels, self.experiment)
        self.val_loader = make_loader(self.pipeline.val_set, self.experiment.batch_size, False, self.runtime, shard=True)

    def train(self, epoch: int, state: TrainingState) -> dict[str, float]:
        """Train epoch ``epoch`` (0-based) in its seeded order; a non-finite loss stops the run."""
        seed = epoch_seed(self.seed, epoch)
        seed_everything(distributed.rank_seed(seed))
        batches = training_batches(self.pipeline, distributed.per_rank_batch(self.experiment.batch_size),
                                   self.runtime, seed)
        train = train_one_epoch(self.pipeline.train_module, batches, self.criterion, state.optimizer,
                                state.scheduler, self.runtime, state.scaler, f"epoch {epoch + 1}")
        if not math.isfinite(train["loss"]):
            raise TrainingError(f"Training loss became {train['loss']} in epoch {epoch + 1}")
        return train

    def validate(self) -> dict[str, float]:
        """Loss and summary metrics on the validation split."""
        return evaluate(self.pipeline.val_module, self.val_loader, self.val_criterion, self.runtime, "val")


def history_row(epoch: int, train: dict[str, float], val: dict[str, float], lr: float,
                seconds: float) -> dict[str, float]:
    """Epoch ``epoch``'s (0-based) row of history.csv: the validation columns are the metrics table's."""
    return {"epoch": epoch + 1, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
            "val_loss": val["loss"], **{f"val_{m.name}": val[m.name] for m in metrics.history_metrics()},
            "lr": lr, "seconds": seconds}


@dataclass
class RunFiles:
    """What ``fit`` writes under ``out_dir``: ``checkpoints/last.pt`` every epoch, ``checkpoints/best.pt``
    for the best one (both in the background, :class:`~cxr.models.checkpoint.CheckpointWriter`) and ``history.csv``.
    Only rank 0 writes: every rank holds the same weights, history and early-stopping state."""

    out_dir: Path
    experiment: Experiment
    prep: dict[str, Any]
    seed: int
    splits: DataSplits
    saved_epochs: int = 0
    best_weights: dict[str, torch.Tensor] | None = None  # what best.pt holds, kept in memory
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)

    @classmethod
    def open(cls, out_dir: Path, experiment: Experiment, prep: dict[str, Any], seed: int, splits: DataSplits,
             state: TrainingState, resumed: bool) -> RunFiles:
        """The run's files, with what a killed run left behind cleaned up: its temporary files removed and,
        on resume, history.csv rewritten as last.pt holds it (a run killed between writing the two left it
        an epoch behind, or, before history followed the checkpoint, ahead)."""
        files = cls(out_dir, experiment, prep, seed, splits, saved_epochs=state.epochs_done)
        if distributed.is_main():
            folder = files.last.parent
            folder.mkdir(parents=True, exist_ok=True)
            removed = remove_stale_temporaries(folder)
            if removed:
                warnings.warn(f"Removed {len(removed)} temporary file(s) that a killed run left in "
                              f"{str(folder)!r} ({', '.join(p.name for p in removed)}).", stacklevel=3)
            if resumed:
                _write_history(state.history, files.history_csv)
        return files

    @staticmethod
    def last_of(out_dir: Path) -> Path:
        return Path(out_dir) / "checkpoints" / "last.pt"

    @property
    def last(self) -> Path:
        return self.last_of(self.out_dir)

    @property
    def best(self) -> Path:
        return self.out_dir / "checkpoints" / "best.pt"

    @property
    def history_csv(self) -> Path:
        return self.out_dir / "history.csv"

    def save(self, state: TrainingState, is_best: bool) -> None:
        """Hand the epoch's checkpoint to the writer (also as best.pt when ``is_best``); history.csv is
        rewritten once the checkpoint is on disk, so it never lists an epoch the checkpoint lacks."""
        if distributed.is_main():
            history = list(state.history)
            written = self.writer.save(state.checkpoint(self.experiment, self.prep, self.seed, self.splits),
                                       *([self.best] if is_best else []), self.last,
                                       then=lambda: _write_history(history, self.history_csv))
            self.best_weights = written["model"] if is_best else self.best_weights
        self.saved_epochs = state.epochs_done

    def best_weights_once_written(self, phase_timer: PhaseTimer = no_timing) -> dict[str, torch.Tensor]:
        """The best epoch's weights, once every checkpoint is on disk (read back from best.pt by the ranks
        that did not write it)."""
        with phase_timer("checkpoint wait"):
            self.writer.wait()
        distributed.barrier()  # rank 0 has written best.pt; the ranks without its copy in memory read it
        if self.best_weights is None:
            with phase_timer("best.pt reload"):
                self.best_weights = load_checkpoint(self.best, experiment=self.experiment.name)["model"]
        return self.best_weights



@dataclass
class TrainingState:
    """Everything that changes while training and goes into a checkpoint: weights, optimiser, schedule,
    loss scaler, history and the early-stopping bookkeeping."""

    model: Classifier
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    history: list[dict[str, float]] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    train_seconds: float = 0.0

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def record(self, row: dict[str, float], monitor: str) -> bool:
        """Add an epoch's row; True when it is the best so far on ``monitor``."""
        self.history.append(row)
        self.train_seconds += row["seconds"]
        if _better(monitor, row[monitor], self.best_value):
            self.best_value, self.best_epoch, self.bad_epochs = row[monitor], row["epoch"], 0
            return True
        self.bad_epochs += 1
        return False

    def checkpoint(self, experiment: Experiment, prep: dict[str, Any], seed: int, splits: DataSplits) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epochs_done,
            "experiment": experiment.to_dict(),
            "classes": list(CLASSES),
            "preprocessing": prep,
            "history": self.history,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "seed": seed,
            "data": data_signature(splits),
            "train_seconds": self.train_seconds,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`checkpoint`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.history = state["history"]
        self.best_value, self.best_epoch, self.bad_epochs = state["best_value"], state["best_epoch"], state["bad_epochs"]
        self.train_seconds = state["train_seconds"]


def build_training_state(model: Classifier, experiment: Experiment, runtime: Runtime, steps_per_epoch: int) -> TrainingState:
    optimizer = build_optimizer(model, experiment, runtime)
    scheduler = build_schedule(optimizer, experiment, steps_per_epoch)
    return TrainingState(model, optimizer, scheduler, runtime.grad_scaler())


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader | DeviceLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    runtime: Runtime,
    scaler: torch.amp.GradScaler | None = None,
    description: str = "train",
) -> dict[str, float]:
    """One pass over ``loader``. Loss and accuracy are summed on the device: one sync per epoch (in a
    torchrun job they are summed over the ranks too, so every rank reports the same numbers)."""
    model.train()
    # BatchNorm in training mode cannot normalise a single image; a last batch of one is left out instead
    # of crashing the epoch (every rank of a torchrun job gets batches of the same size, so all skip it).
    batchnorm_trains = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    seen, full_batch = 0, getattr(loader, "batch_size", None)
    for images, labels in tqdm(loader, desc=description, leave=False, disable=not runtime.progress):
        if batchnorm_trains and labels.numel() == 1:
            continue
        images, labels = runtime.to_device(images), runtime.to_device(labels)
        with runtime.tuning(labels.numel(), full_batch):
            with runtime.autocast():
                logits = model(images)
                loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.argmax(1) == labels).sum()
        seen += labels.numel()
    loss_sum, correct, seen = distributed.sum_across_ranks(loss_sum, correct, torch.tensor(seen, device=runtime.device))
    return {"loss": loss_sum.item() / seen.item(), "accuracy": correct.item() / seen.item()}


@torch.inference_mode()
def predict(
    model: nn.Module, loader: DataLoader | DeviceLoader, runtime: Runtime, description: str = "eval",
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and labels for every sample of ``loader``, in order. For a loader sharded
    over a torchrun job (``make_loader(..., shard=True)``) every rank predicts its part and gets the
    whole split back, in order."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, desc=description, leave=False, disable=not runtime.progress):
        with runtime.tuning(len(labels), getattr(loader, "batch_size", None)), runtime.autocast():
            all_logits.append(model(runtime.to_device(images)).float())
        all_labels.append(runtime.to_device(labels))
    logits, labels = gather_shards(loader, torch.cat(all_logits), torch.cat(all_labels))
    return logits.cpu().numpy(), labels.cpu().numpy()


def summarize(logits: np.ndarray, labels: np.ndarray, criterion: nn.Module | None = None) -> dict[str, float]:
    """Loss, the summary metrics of the table (:mod:`cxr.evaluate.metrics`) that hard predictions give, and every
    metric recorded in the history (those that need probabilities from the logits' softmax)."""
    predictions = logits.argmax(1)
    confusion = metrics.confusion(labels, predictions, logits.shape[1])
    result = {m.name: float(m.function(confusion)) for m in metrics.summary_metrics() if not m.needs_probabilities}
    from_probabilities = [m for m in metrics.history_metrics() if m.needs_probabilities]
    if from_probabilities:
        probabilities = torch.from_numpy(logits).double().softmax(1).numpy()
        result.update({m.name: float(m.function(labels, probabilities)) for m in from_probabilities})
    if criterion is not None:
        result["loss"] = float(criterion(torch.from_numpy(logits), torch.from_numpy(labels).long()))
    return result


def evaluate(
    model: nn.Module, loader: DataLoader | DeviceLoader, criterion: nn.Module, runtime: Runtime, description: str = "eval",
) -> dict[str, float]:
    logits, labels = predict(model, loader, runtime, description)
    return summarize(logits, labels, criterion.cpu())


def class_weights(labels: list[int], num_classes: int = len(CLASSES)) -> torch.Tensor:
    """Inverse-frequency weights from the training split (sklearn's 'balanced'), never hard-coded."""
    present = np.unique(labels)
    weights = np.ones(num_classes, dtype=np.float32)
    weights[present] = compute_class_weight("balanced", classes=present, y=np.asarray(labels))
    return torch.tensor(weights, dtype=torch.float32)


def training_loss(train_labels: list[int], experiment: Experiment, device: torch.device) -> nn.Module:
    """The experiment's loss (:func:`cxr.train.losses.build_loss`), weighted by the training split's class
    frequencies, with its label smoothing."""
    return build_loss(experiment, class_weights(train_labels)).to(device)


def validation_loss(train_labels: list[int], experiment: Experiment) -> nn.Module:
    """The same loss without label smoothing, on the CPU where validation scores are computed."""
    return build_loss(experiment, class_weights(train_labels), validation=True)


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


def _better(monitor: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of the monitored history column improves on ``best`` (the table says which way)."""
    if best is None:
        return True
    lower = monitor == "val_loss" or any(monitor == f"val_{m.name}" and not m.higher_is_better
                                         for m in metrics.METRICS)
    return value < best if lower else value > best


def _write_history(history: list[dict[str, float]], path: Path) -> None:
    """history.csv, replaced atomically (a temporary file renamed over it): a kill never leaves half a table."""
    if history:
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(history[0]))
                writer.writeheader()
                writer.writerows(history)
            os.replace(temporary, path)
        except OSError as error:
            raise CheckpointError(f"Could not write {str(path)!r} ({error}); is the disk full?") from None
        finally:
            temporary.unlink(missing_ok=True)


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


def files_signature(split: Split, root: Path, by_content: bool = True) -> str:
    """SHA-256 of every file's path (below ``root``), label and content digest (``by_content``), else size
    and modification time (what checkpoints before content digests stored): swapping one image for another,
    or replacing one in place with the same size and timestamp, changes it even where the per-class counts
    stay the same. Each file is read once per run (:func:`cxr.common.fileid.content_digest` remembers it)."""
    digest = hashlib.sha256()
    prefix = os.path.join(str(root), "")
    for path, label in zip(split.paths, split.labels):
        name = str(path)[len(prefix):] if str(path).startswith(prefix) else str(path)
        if by_content:
            identity = content_digest(path)
        else:
            stat = os.stat(path)
            identity = f"{stat.st_size}\0{stat.st_mtime_ns}"
        digest.update(text_bytes(f"{name}\0{label}\0{identity}\n"))
    return digest.hexdigest()


def data_signature(splits: DataSplits, by_content: bool = True) -> dict[str, Any]:
    """What a resumed run must see again: the same validation source, per-class counts and files (and where
    they were, so that ``cxr evaluate --external`` finds the training data without ``--data-dir``)."""
    return {"val_source": splits.val_source, "counts": splits.counts(), "root": str(Path(splits.root).resolve()),
            "files_by": "content" if by_content else "stat",
            "files": {name: files_signature(getattr(splits, name), splits.root, by_content)
                      for name in ("train", "val", "test")}}


def data_differences(saved: dict[str, Any], wanted: dict[str, Any], path: Path) -> list[str]:
    """How the data of a checkpoint and of this run differ, in words. A checkpoint written before the
    file signatures existed can only be compared by counts: it is resumed with a warning."""
    differences = [f"data {key}={saved[key]!r} (now {wanted[key]!r})" for key in ("val_source", "counts")
                   if key in saved and saved[key] != wanted[key]]
    if "files" not in saved:
        warnings.warn(f"{str(path)!r} predates file signatures: only the per-class image counts could be compared "
                      "with this run's data.", stacklevel=3)
        return differences
    changed = [name for name, digest in wanted["files"].items() if saved["files"].get(name) != digest]
    compared = "contents" if wanted["files_by"] == "content" else "modification times"
    if changed and not differences:
        differences.append(f"the {', '.join(changed)} image files differ (names, sizes or {compared}; "
                           "the per-class counts are the same)")
    return differences


def check_resumable(state: dict[str, Any], path: Path, experiment: Experiment, seed: int, splits: DataSplits) -> None:
    """Refuse to resume from a checkpoint written with other settings, seed or data: the continued run
    would silently differ from the one that was interrupted."""
    saved = {**state["experiment"], **{key: state[key] for key in ("seed",) if key in state}}
    wanted = {**experiment.to_dict(), "seed": seed}
    differences = [f"{key}={saved[key]!r} (now {wanted[key]!r})" for key in wanted
                   if key in saved and saved[key] != wanted[key]]
    if isinstance(state.get("data"), dict):
        by_content = state["data"].get("files_by") == "content"  # else written before content digests
        differences += data_differences(state["data"], data_signature(splits, by_content), path)
    if differences:
        raise CheckpointError(
            f"{str(path)!r} was written with other settings: {'; '.join(differences)}. "
            "Resume with the same options (experiment flags, --seed, --data-dir, --val-source) as the interrupted run."
        )


def _interrupted(experiment: Experiment, saved_epochs: int, last_path: Path) -> TrainingInterrupted:
    done = "epoch 1" if saved_epochs == 1 else f"epochs 1-{saved_epochs}"
    saved = (f"{done} of {experiment.epochs} saved in {str(last_path)!r}; to continue, run the same "
             "command again with --resume (from Python: resume=True)" if saved_epochs
             else "no epoch was finished, so there is nothing to resume")
    return TrainingInterrupted(f"Training interrupted: {saved}.", saved_epochs)


def _failed(error: TrainingError, saved_epochs: int, last_path: Path) -> TrainingError:
    kept = (f"the last good checkpoint (epoch {saved_epochs}) is {str(last_path)!r}" if saved_epochs
            else "no checkpoint was written")
    return TrainingError(f"{error}; {kept}. Try a lower --lr.")
