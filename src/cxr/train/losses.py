"""The losses, chosen by name (``Experiment.loss``) through :func:`build_loss`: a new loss is one entry of
:data:`LOSSES` (its module in :mod:`cxr.train.loss_functions` where PyTorch lacks one). This module imports no
PyTorch, so the command line lists its names and a run checks ``Experiment.loss`` against :data:`LOSSES`
before any heavy import or any work."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from cxr.config import Experiment


def weighted_ce(class_weights: torch.Tensor, experiment: Experiment, label_smoothing: float) -> nn.Module:
    """Class-weighted cross-entropy; with label smoothing the sync-free
    :class:`~cxr.train.loss_functions.WeightedSmoothedCrossEntropy`, without it PyTorch's own (which needs no host
    sync then), so both equal ``nn.CrossEntropyLoss``."""
    from torch import nn

    from cxr.train.loss_functions import WeightedSmoothedCrossEntropy

    if label_smoothing:
        return WeightedSmoothedCrossEntropy(class_weights, label_smoothing)
    return nn.CrossEntropyLoss(weight=class_weights.float())


def focal(class_weights: torch.Tensor, experiment: Experiment, label_smoothing: float) -> nn.Module:
    """:class:`~cxr.train.loss_functions.FocalLoss` with the class weights as alpha and the experiment's
    ``focal_gamma`` (label smoothing does not apply)."""
    from cxr.train.loss_functions import FocalLoss

    return FocalLoss(class_weights, experiment.focal_gamma)


LOSSES: dict[str, Callable[[torch.Tensor, Experiment, float], nn.Module]] = {"weighted_ce": weighted_ce,
                                                                            "focal": focal}


def check_loss_name(name: str) -> None:
    """A one-line error unless ``name`` is a key of :data:`LOSSES` (``workflow.train_experiment`` calls it first)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")


def build_loss(experiment: Experiment, class_weights: torch.Tensor, validation: bool = False) -> nn.Module:
    """The loss ``experiment.loss`` (a key of :data:`LOSSES`) weighted by ``class_weights``, with the
    experiment's label smoothing; with ``validation`` the same loss unsmoothed, so the validation loss
    compares across experiments that smooth differently."""
    check_loss_name(experiment.loss)
    return LOSSES[experiment.loss](class_weights, experiment, 0.0 if validation else experiment.label_smoothing)
