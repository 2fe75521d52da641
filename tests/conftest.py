"""Shared fixtures: a tiny synthetic dataset in the Kaggle layout, and settings for fast CPU runs."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from cxr.data.synthetic import write_synthetic_dataset  # noqa: E402

# Small enough that every experiment trains an epoch on 2 CPU cores in seconds.
TINY = {"epochs": 1, "batch_size": 8, "image_size": 32, "weights": "none"}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kaggle layout with the TURBERCULOSIS spelling and corrupt, empty, truncated, non-image,
    grayscale, RGBA and 16-bit files. Session-scoped: treat it as read-only."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("kaggle") / "chest_xray")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 32 px ResNet50 checkpoint in ``cxr train``'s format (random weights: for tests of the plumbing)."""
    import torch

    from cxr.models.checkpoint import save_checkpoint
    from cxr.config import get_experiment
    from cxr.data.layout import CLASSES
    from cxr.models.classifier import build_model, preprocessing

    torch.manual_seed(0)
    experiment = get_experiment("resnet50_full", epochs=1, batch_size=8, image_size=32, weights="none")
    model = build_model("resnet50", weights="none", image_size=32)
    path = tmp_path_factory.mktemp("run") / "best.pt"
    save_checkpoint({"model": model.state_dict(), "experiment": experiment.to_dict(), "classes": list(CLASSES),
                     "epoch": 1, "preprocessing": preprocessing("resnet50", 32), "seed": 42}, path)
    return str(path)


@pytest.fixture
def tiny() -> dict:
    return dict(TINY)


@pytest.fixture(autouse=True)
def _no_dataset_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not pick up a developer's CXR_DATA_DIR (nor the other notebook settings)."""
    for name in ("CXR_DATA_DIR", "CXR_KAGGLE_INPUT", "CXR_LIMIT", "CXR_IMAGE_SIZE", "CXR_OUT", "CXR_ADD_TRAIN"):
        monkeypatch.delenv(name, raising=False)


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


@pytest.fixture(scope="module")
def cuda_like(tmp_path_factory):
    """A Runtime that makes every choice a CUDA run makes, on the CPU (tests/test_cuda_paths.py, test_cuda_steps.py)."""
    from cxr.common.runtime import Runtime

    return Runtime.cuda_like("cpu", progress=False, cache_dir=tmp_path_factory.getbasetemp() / "cxr-cache")
