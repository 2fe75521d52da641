"""Where a result came from: the code's commit and a description of the dataset, for metrics.json,
exports and benchmark results."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from cxr.data.dataset import DataSplits
from cxr.data.layout import KAGGLE_HANDLE


def git_commit(where: str | os.PathLike | None = None) -> str | None:
    """The commit of the checkout holding ``where`` (default: this package), with ``-dirty`` when tracked
    files other than the results under ``assets/`` differ from it. Results are left out because re-running
    an experiment rewrites its committed results before it asks. ``$CXR_COMMIT``, when set, wins: a copy of
    the tree on a GPU machine may carry another commit's git metadata. None outside a git checkout."""
    if os.environ.get("CXR_COMMIT"):
        return os.environ["CXR_COMMIT"]
    where = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=where, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)assets"], cwd=where, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def dataset_info(splits: DataSplits) -> dict[str, Any]:
    """Which dataset a run read (its Kaggle handle or folder name), how its validation split was made and
    how many images of each class and split it held."""
    kaggle = "kagglehub" in str(splits.root) or KAGGLE_HANDLE.split("/")[1] in str(splits.root)
    return {
        "name": KAGGLE_HANDLE if kaggle else splits.root.name,
        "root": str(splits.root),
        "val_source": splits.val_source,
        "counts": splits.counts(),
        "limit_per_class": splits.limit,
        "skipped_files": len(splits.skipped),
    }
