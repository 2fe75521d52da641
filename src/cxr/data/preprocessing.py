"""A checkpoint's evaluation input in one place: the image size, the resize before the centre crop and the
normalisation, as the dataclass that prediction, Grad-CAM, the checks and export share. Checkpoints and
``model.json`` store it as a plain dict (:meth:`Preprocessing.as_dict`); everything that turns a decoded
square into network input reads it through :meth:`Preprocessing.from_dict`, so the recipe has one home."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from cxr.data.augment import EvalTransform
from cxr.data.imageio import cache_side

FIELDS = ("image_size", "resize", "mean", "std")


@dataclass(frozen=True)
class Preprocessing:
    """Resize the decoded square to ``resize``, centre-crop ``image_size``, repeat the gray channel on three
    channels and normalise each with ``mean`` and ``std``."""

    image_size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_dict(cls, preprocessing: Mapping[str, Any]) -> Preprocessing:
        """The recipe as a checkpoint or ``model.json`` stores it (extra keys, such as export's steps, ignored)."""
        return cls(preprocessing["image_size"], preprocessing["resize"], tuple(preprocessing["mean"]),
                   tuple(preprocessing["std"]))

    def as_dict(self) -> dict[str, Any]:
        """The stored form: ``{"image_size", "resize", "mean": [...], "std": [...]}``."""
        return {"image_size": self.image_size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std)}

    @property
    def square_side(self) -> int:
        """Side of the decoded square (:func:`cxr.data.imageio.decode_image`) the inputs are cut from."""
        return cache_side(self.image_size, self.resize)

    def transform(self) -> EvalTransform:
        """The evaluation crop and normalisation, on a ``(B, 1, S, S)`` batch of decoded uint8 squares."""
        return EvalTransform(self.image_size, self.resize, self.mean, self.std)
