"""What one training run is asked to do, beside its configuration and its :class:`~cxr.common.runtime.Runtime`.

The CLI and the notebooks build one :class:`RunOptions` and hand it to :func:`cxr.workflow.train_experiment`,
instead of a dozen keyword arguments repeated at every call. How the run executes (device, cache, workers,
precision) is the Runtime's; what the model learns is the :class:`~cxr.config.Experiment`'s; the rest is here.
No torch import: the CLI builds it before the heavy imports are needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cxr.data.added_folders import AddedFolders


@dataclass(frozen=True)
class RunOptions:
    """``seed`` seeds the split carved from training (``val_source="carve"``), the new head and the batches;
    ``limit`` keeps at most that many images per class in each split (a quick run); ``resume`` continues the
    run in ``out/<name>/`` from its last checkpoint; ``overwrite`` lets the run replace another run's results
    there; ``deterministic`` allows only deterministic kernels; ``tensorboard`` also writes event files into
    ``out/<name>/tensorboard/``; ``lung_masks``: a folder of per-image lung masks for the checks;
    ``add_train``: folders whose images join training (a list of folders, or
    :class:`~cxr.data.added_folders.AddedFolders` with its holdout); ``external``: folders scored after training."""

    seed: int = 42
    val_source: str = "carve"
    limit: int | None = None
    resume: bool = False
    overwrite: bool = False
    deterministic: bool = False
    tensorboard: bool = True
    lung_masks: str | os.PathLike | None = None
    add_train: AddedFolders | None = None
    external: tuple[str | os.PathLike, ...] = ()

    def __post_init__(self) -> None:  # a list of folders for add_train, a list for external
        object.__setattr__(self, "add_train", AddedFolders.of(self.add_train))
        object.__setattr__(self, "external", tuple(self.external))

