"""The three experiments, each one named configuration.

The experiments differ only by these values; the code that trains them is shared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Monitor = Literal["val_macro_f1", "val_loss"]


@dataclass(frozen=True)
class Experiment:
    """Everything that defines one experiment. Plain data: it goes into checkpoints and metrics.json."""

    name: str
    arch: Literal["resnet152", "resnet50", "vit_b_16"]
    freeze_backbone: bool
    summary: str
    epochs: int
    batch_size: int
    lr: float
    backbone_lr: float
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    augment: bool = True
    patience: int = 6
    monitor: Monitor = "val_macro_f1"
    image_size: int = 224
    weights: str = "imagenet"
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
