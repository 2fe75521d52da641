"""The three experiments, each one named configuration.

The experiments differ only by these values; the code that trains them is shared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Monitor = Literal["val_macro_f1", "val_loss"]


def tunable(help: str, default: Any = dataclasses.MISSING, minimum: float | None = None,
            above: float | None = None) -> Any:
    """A field that ``cxr train`` offers as a flag, with its help text and the values it accepts (at least
    ``minimum``, or greater than ``above``); the flag's default is the experiment's own value, so a
    hyperparameter is written once, here."""
    return dataclasses.field(default=default, metadata={"help": help, "minimum": minimum, "above": above})


@dataclass(frozen=True)
class Experiment:
    """Everything that defines one experiment. Plain data: it goes into checkpoints and metrics.json."""

    name: str
    arch: Literal["resnet152", "resnet50", "vit_b_16"]
    freeze_backbone: bool
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
    weights: str = tunable("imagenet, none (random initialisation), or PATH to a local .pth state dict", "imagenet")
    optimizer: str = "adamw"
    schedule: str = "warmup+cosine"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            name="resnet152_head",
            arch="resnet152",
            freeze_backbone=True,
            summary="ResNet152, ImageNet backbone frozen (eval mode), new linear head on the 2048-d pooled features",
            epochs=20,
            batch_size=64,
            lr=1e-3,
            backbone_lr=0.0,
            weight_decay=1e-4,
        ),
        Experiment(
            name="resnet50_full",
            arch="resnet50",
            freeze_backbone=False,
            summary="ResNet50, every parameter trained, new linear head; backbone at a 10x lower learning rate",
            epochs=30,
            batch_size=64,
            lr=1e-3,
            backbone_lr=1e-4,
            weight_decay=0.05,
            warmup_epochs=2,
            patience=8,
        ),
        Experiment(
            name="vit_b16_head",
            arch="vit_b_16",
            freeze_backbone=True,
            summary="ViT-B/16, ImageNet backbone frozen (eval mode), new linear head on the class token",
            epochs=20,
            batch_size=64,
            lr=1e-3,
            backbone_lr=0.0,
            weight_decay=1e-4,
        ),
    )
}


def get_experiment(name: str, **overrides: Any) -> Experiment:
    """Look up a named experiment and apply command-line overrides (None values are ignored)."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(EXPERIMENTS[name], **changes)


def experiment_from_dict(data: dict[str, Any]) -> Experiment:
    """Rebuild an experiment from the plain dict stored in a checkpoint (keys it no longer has are dropped:
    older checkpoints also stored ``cache``, ``feature_cache`` and ``compile``, which are now how a run
    executes, the :class:`~cxr.runtime.Runtime`'s)."""
    known = {f.name for f in dataclasses.fields(Experiment)}
    return Experiment(**{k: v for k, v in data.items() if k in known})
