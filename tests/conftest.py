"""Shared fixtures: a tiny synthetic dataset in the Kaggle layout, and settings for fast CPU runs."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from cxr.synthetic import write_synthetic_dataset  # noqa: E402

# Small enough that every experiment trains an epoch on 2 CPU cores in seconds.
TINY = {"epochs": 1, "batch_size": 8, "image_size": 32, "weights": "none"}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kaggle layout with the TURBERCULOSIS spelling and corrupt, empty, truncated, non-image,
    grayscale, RGBA and 16-bit files. Session-scoped: treat it as read-only."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("kaggle") / "chest_xray")


@pytest.fixture
def tiny() -> dict:
    return dict(TINY)


@pytest.fixture(autouse=True)
def _no_dataset_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not pick up a developer's CXR_DATA_DIR."""
    monkeypatch.delenv("CXR_DATA_DIR", raising=False)


@pytest.fixture(autouse=True)
def _session_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Training in tests writes its decoded-image cache to the session's temporary folder, not ~/.cache/cxr."""
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cxr-cache"))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """One intra-op thread per test process: the tiny test models gain little from two, and when several
    test runs share the machine's cores, spinning OpenMP threads made a 2-epoch run about 8x slower."""
    import torch

    torch.set_num_threads(1)
