"""--seed fixes every random choice and --deterministic the kernels: two CPU runs with one seed are identical."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from cxr.models.checkpoint import load_checkpoint
from cxr.cli import main
from cxr.train.engine import make_deterministic
from cxr.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    counts = {"train": 5, "val": 2, "test": 2}
    return write_synthetic_dataset(tmp_path_factory.mktemp("determinism") / "data", counts, size=32, bad_files=False)


@pytest.fixture
def restore_determinism(monkeypatch):
    """make_deterministic changes process-wide settings; put them back for the other tests."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1:]


def test_make_deterministic_sets_torch_and_cublas(restore_determinism):
    make_deterministic()
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def train_once(root, out, seed: int) -> dict:
    argv = ["train", "mobilenet_v2_full", "--data-dir", str(root), "--out", str(out), "--seed", str(seed),
            "--deterministic", "--val-source", "given", "--epochs", "1", "--batch-size", "8", "--image-size", "32",
            "--weights", "none", "--quiet"]
    assert main(argv) == 0
    run = out / "mobilenet_v2_full"
    with open(run / "history.csv", newline="") as handle:
        history = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]
    metrics = json.loads((run / "metrics.json").read_text())
    return {"history": history, "test": metrics["test"], "deterministic": metrics["deterministic"],
            "weights": load_checkpoint(run / "checkpoints" / "last.pt")["model"]}


def test_same_seed_gives_identical_runs(small_root, tmp_path, restore_determinism):
    first, second = train_once(small_root, tmp_path / "a", 7), train_once(small_root, tmp_path / "b", 7)
    assert first["deterministic"] and torch.are_deterministic_algorithms_enabled()
    assert first["history"] == second["history"]
    assert first["test"] == second["test"]
    assert all(torch.equal(first["weights"][k], second["weights"][k]) for k in first["weights"])

    other = train_once(small_root, tmp_path / "c", 8)  # the seed matters: another one trains differently
    assert other["history"] != first["history"]
    assert not all(torch.equal(first["weights"][k], other["weights"][k]) for k in first["weights"])
