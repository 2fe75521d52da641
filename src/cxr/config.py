"""The experiments, each one named configuration, and the training augmentation's parameters.

The experiments differ only by these values; the code that trains them is shared, and every field is read
by it: the factories in :mod:`cxr.train.optim` and :mod:`cxr.train.losses` pick the optimiser, schedule and loss by
name, and ``trainable_blocks`` decides how much of the backbone learns (:class:`cxr.models.classifier.Classifier`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Monitor = Literal["val_macro_f1", "val_loss"]
TrainableBlocks = int | Literal["all"]


@dataclass(frozen=True)
class ResizedCrop:
    """Random resized crop: a random part of the image, resized to the model's input."""

    scale: tuple[float, float] = (0.7, 1.0)  # fraction of the area kept
    ratio: tuple[float, float] = (0.9, 1.1)  # its aspect ratio


@dataclass(frozen=True)
class HorizontalFlip:
    """Mirror left-right; never top-bottom (X-rays have a top and a bottom)."""

    probability: float = 0.5


@dataclass(frozen=True)
class Affine:
    """A small rotation about the centre, then a shift."""

    degrees: float = 7.0  # rotation, +-
    translate: float = 0.04  # shift, +- this fraction of the side


@dataclass(frozen=True)
class Brightness:
    """Scale every pixel by one random factor."""

    strength: float = 0.2  # +- 20%


@dataclass(frozen=True)
class Contrast:
    """Stretch or squeeze the pixels about the image's mean by one random factor."""

    strength: float = 0.2  # +- 20%


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation for chest X-rays: small geometric and exposure changes, never a vertical flip.
    The one list of its operations, in the order they apply, each with its parameters; None leaves one out.
    :mod:`cxr.data.augment_ops` holds each operation's on-device version beside its torchvision reference, from
    which ``augment.TrainAugment``, ``data.build_transforms`` and ``uncertainty.TTAViews`` are built."""

    resized_crop: ResizedCrop | None = ResizedCrop()
    horizontal_flip: HorizontalFlip | None = HorizontalFlip()
    affine: Affine | None = Affine()
    brightness: Brightness | None = Brightness()
    contrast: Contrast | None = Contrast()

    def operations(self) -> tuple[Any, ...]:
        """The operations that apply, in order."""
        return tuple(op for op in (getattr(self, f.name) for f in dataclasses.fields(self)) if op is not None)


AUGMENTATION = Augmentation()


def tunable(help: str, default: Any = dataclasses.MISSING, minimum: float | None = None,
            above: float | None = None) -> Any:
    """A field that ``cxr train`` offers as a flag, with its help text and the values it accepts (at least
    ``minimum``, or greater than ``above``); the flag's default is the experiment's own value, so a
    hyperparameter is written once, here. A field named in a registry (``loss``: :data:`cxr.train.losses.LOSSES`) is
    checked against it where the run starts (the configuration imports nothing of cxr)."""
    return dataclasses.field(default=default, metadata={"help": help, "minimum": minimum, "above": above})


@dataclass(frozen=True)
class Experiment:
    """Everything that defines one experiment. Plain data: it goes into checkpoints and metrics.json."""

    name: str
    arch: str  # a name in cxr.models.backbones.BACKBONES
    trainable_blocks: TrainableBlocks  # 0: frozen backbone (head only); N: its last N blocks, final norm, head
    summary: str
    epochs: int = tunable("most epochs to train (early stopping may end sooner)", minimum=1)
    batch_size: int = tunable("images per training step", minimum=1)
    lr: float = tunable("learning rate of the head (peak of the schedule)", above=0)
    backbone_lr: float = tunable("learning rate of a trained backbone (0 for a frozen one)", minimum=0)
    weight_decay: float = tunable("AdamW weight decay", 0.05, minimum=0)
    warmup_epochs: int = tunable("epochs of linear learning-rate warm-up", 1, minimum=0)
    label_smoothing: float = tunable("label smoothing of the weighted cross-entropy", 0.1, minimum=0)
    augment: bool = tunable("training augmentation (small shifts, crops, mirroring, exposure)", True)
    patience: int = tunable("early-stopping patience in epochs of no better validation score (0: off)", 6,
                            minimum=0)
    monitor: Monitor = tunable("validation score that picks the best epoch and stops early", "val_macro_f1")
    image_size: int = tunable("side in pixels of the square the model sees", 224, minimum=1)
    weights: str = tunable("imagenet, none (random initialisation), or PATH to a local state dict (torchvision's "
                           "layout; MobileNetV2 also the reference one); $CXR_WEIGHTS when not given", "imagenet")
    optimizer: str = "adamw"  # a name in cxr.train.optim.OPTIMIZERS
    schedule: str = "warmup+cosine"  # a name in cxr.train.optim.SCHEDULES
    loss: str = tunable("the loss, a name in cxr.train.losses.LOSSES (weighted by the training split's classes)",
                        "weighted_ce")
    focal_gamma: float = tunable("focusing strength of the focal loss", 2.0, minimum=0)

    @property
    def freeze_backbone(self) -> bool:
        """Whether the whole backbone is frozen (head only): then it can run once, as cached features."""
        return self.trainable_blocks == 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RESNET50_FULL = Experiment(
    name="resnet50_full",
    arch="resnet50",
    trainable_blocks="all",
    summary="ResNet50, every parameter trained, new linear head; backbone at a 10x lower learning rate",
    epochs=30,
    batch_size=64,
    lr=1e-3,
    backbone_lr=1e-4,
    weight_decay=0.05,
    warmup_epochs=2,
    patience=8,
)

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            name="resnet152_head",
            arch="resnet152",
            trainable_blocks=0,
            summary="ResNet152, ImageNet backbone frozen (eval mode), new linear head on the 2048-d pooled features",
            epochs=20,
            batch_size=64,
            lr=1e-3,
            backbone_lr=0.0,
            weight_decay=1e-4,
        ),
        RESNET50_FULL,
        Experiment(
            name="vit_b16_head",
            arch="vit_b_16",
            trainable_blocks=0,
            summary="ViT-B/16, ImageNet backbone frozen (eval mode), new linear head on the class token",
            epochs=20,
            batch_size=64,
            lr=1e-3,
            backbone_lr=0.0,
            weight_decay=1e-4,
        ),
        dataclasses.replace(  # resnet50_full's recipe, another loss
            RESNET50_FULL, name="resnet50_focal", loss="focal", focal_gamma=2.0,
            summary="resnet50_full with focal loss (gamma 2, the class weights as alpha) for the rarer classes' recall",
        ),
        Experiment(
            name="vit_b16_partial",
            arch="vit_b_16",
            trainable_blocks=4,
            summary="ViT-B/16, last 4 encoder blocks, final norm and new head trained; the rest frozen (eval mode)",
            epochs=20,
            batch_size=64,
            lr=1e-3,
            backbone_lr=1e-4,
            weight_decay=0.05,
            warmup_epochs=2,
        ),
        Experiment(
            name="mobilenet_v2_head",
            arch="mobilenet_v2",
            trainable_blocks=0,
            summary="MobileNetV2, ImageNet backbone frozen (eval mode), new linear head on the 1280-d pooled "
                    "features, no augmentation: the features are computed once, so it trains in minutes on a CPU",
            epochs=30,
            batch_size=64,
            lr=1e-3,
            backbone_lr=0.0,
            weight_decay=1e-4,
            augment=False,
        ),
        Experiment(
            name="mobilenet_v2_full",
            arch="mobilenet_v2",
            trainable_blocks="all",
            summary="MobileNetV2, every parameter trained, new linear head; backbone at a 10x lower learning rate; "
                    "trains on a CPU",
            epochs=6,
            batch_size=32,
            lr=1e-3,
            backbone_lr=1e-4,
            weight_decay=0.05,
            warmup_epochs=1,
            patience=4,
        ),
    )
}


def get_experiment(name: str, **overrides: Any) -> Experiment:
    """Look up a named experiment and apply command-line overrides (None values are ignored)."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(EXPERIMENTS[name], **changes)


def upgrade_experiment_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A stored experiment dict in today's terms: older checkpoints and exports say ``freeze_backbone``
    (True: ``trainable_blocks=0``, False: ``"all"``)."""
    data = dict(data)
    if "freeze_backbone" in data:
        frozen = data.pop("freeze_backbone")
        data.setdefault("trainable_blocks", 0 if frozen else "all")
    return data


def experiment_from_dict(data: dict[str, Any]) -> Experiment:
    """Rebuild an experiment from the plain dict stored in a checkpoint (keys it no longer has are dropped:
    older checkpoints also stored ``cache``, ``feature_cache`` and ``compile``, which are now how a run
    executes, the :class:`~cxr.common.runtime.Runtime`'s; their ``freeze_backbone`` becomes ``trainable_blocks``)."""
    known = {f.name for f in dataclasses.fields(Experiment)}
    return Experiment(**{k: v for k, v in upgrade_experiment_dict(data).items() if k in known})
