"""``torchrun`` with two gloo processes on the CPU trains, validates and tests like one process.

The same command runs twice on the same data, seed and global batch (8): once as a plain process,
once as ``torchrun --standalone --nproc_per_node 2 -m cxr train ...`` (each rank trains on 4 images of
every batch). The runs must agree: test and validation metrics, test logits (in dataset order),
history, and the trained weights in ``best.pt`` (same keys as a single process), up to float
rounding (a mean over 8 differs in the last bits from the average of two means over 4). The test
also checks that only rank 0 wrote files, including the decoded-image cache.

Why equality holds here, and what differs in other settings (docs/multi-gpu.md):

- The training split is class-balanced, so every class weight is 1 and each rank's weighted mean
  loss has the same denominator. With unequal weights the ranks' batch shares can hold different
  class mixes; each rank normalises by its own weight sum, and DDP's average of those means is not
  the single process's mean over the whole batch (the gradients differ slightly).
- 32 training images make 4 full global batches. An uneven last batch is padded by repeating up
  to ``world - 1`` images (DistributedSampler) and its per-rank shares differ in size.
- ``mobilenet_v2_head`` keeps its backbone frozen in eval mode. ``resnet50_full`` trains BatchNorm layers,
  whose batch statistics are computed per rank (over ``batch / world`` images) without SyncBatchNorm.
- Augmentation is off: with it, each rank draws its own random crops (``distributed.rank_seed``),
  so the augmented images, not their distribution, differ from a single process.
- Validation has 11 images and test 15: the shards need padding, which gathering must drop.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from cxr.common import distributed
from cxr.data.cache import FORMAT_VERSION
from cxr.data.augment import DeviceDataset, DeviceLoader
from cxr.cli import main
from cxr.train.pipeline import make_loader
from cxr.data.synthetic import write_synthetic_dataset
from cxr.common.runtime import Runtime

CPU = Runtime.create("cpu", progress=False)

EXPERIMENT = "mobilenet_v2_head"
COUNTS = {"train": 8, "val": 3, "test": 4}  # per class; one image each is then removed from val and test
FLAGS = ["--epochs=2", "--batch-size=8", "--image-size=32", "--weights=none", "--device=cpu", "--seed=3",
         "--val-source=given", "--no-augment", "--quiet"]

# Loaded by every process of the torchrun job through PYTHONPATH: one log per rank of each file the
# process opens for writing or renames into place (torch.save writes in C++, then renames).
WRITE_LOGGER = textwrap.dedent('''
    import os
    import sys

    if os.environ.get("CXR_WRITE_LOG"):
        _log = os.open(f"{os.environ['CXR_WRITE_LOG']}.rank{os.environ.get('RANK', '-')}",
                       os.O_WRONLY | os.O_CREAT | os.O_APPEND)

        def _record(event, args):
            if event == "open":
                path, writes = args[0], bool(args[2] & (os.O_WRONLY | os.O_RDWR))
            elif event == "os.rename":
                path, writes = args[1], True
            else:
                return
            if writes and isinstance(path, (str, bytes, os.PathLike)):
                os.write(_log, os.fsencode(os.path.abspath(os.fsdecode(path))) + b"\\n")

        sys.addaudithook(_record)
''')


@dataclass
class Runs:
    base: Path
    one: Path  # the single-process run's files
    two: Path  # the torchrun job's files
    job: subprocess.CompletedProcess
    single_exit_code: int


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    base = tmp_path_factory.mktemp("distributed")
    data = write_synthetic_dataset(base / "data", COUNTS, size=32, bad_files=False)
    for split, folder in (("val", "COVID19"), ("test", "NORMAL")):
        sorted((data / split / folder).iterdir())[-1].unlink()
    (base / "hook").mkdir()
    (base / "hook" / "sitecustomize.py").write_text(WRITE_LOGGER)
    env = {**os.environ, "CXR_CACHE_DIR": str(base / "cache-two"), "CXR_WRITE_LOG": str(base / "writes"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(base / "hook"), os.environ.get("PYTHONPATH")]))}
    env.pop("CXR_DATA_DIR", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "cxr", "train", EXPERIMENT, f"--data-dir={data}", f"--out={base / 'two'}", *FLAGS]
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # the single-process run meanwhile, in this process
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()):
            patch.setenv("CXR_CACHE_DIR", str(base / "cache-one"))
            patch.delenv("CXR_DATA_DIR", raising=False)
            single_exit_code = main(["train", EXPERIMENT, f"--data-dir={data}", f"--out={base / 'one'}", *FLAGS])
        stdout, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    yield Runs(base, base / "one" / EXPERIMENT, base / "two" / EXPERIMENT,
               subprocess.CompletedProcess(command, job.returncode, stdout, stderr), single_exit_code)
    for run in ("one", "two"):  # each checkpoint holds the whole 86M-parameter backbone
        shutil.rmtree(base / run / EXPERIMENT / "checkpoints", ignore_errors=True)


def assert_close(single, job, where: str = "metrics") -> None:
    """Nested dicts and lists equal, floats up to rounding."""
    if isinstance(single, dict):
        assert single.keys() == job.keys(), where
        for key in single:
            assert_close(single[key], job[key], f"{where}/{key}")
    elif isinstance(single, list):
        assert len(single) == len(job), where
        for index, (a, b) in enumerate(zip(single, job)):
            assert_close(a, b, f"{where}/{index}")
    elif isinstance(single, float):
        assert job == pytest.approx(single, rel=1e-5, abs=1e-6), where
    else:
        assert single == job, where


def read_history(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def test_torchrun_job_succeeds_and_reports_once(runs):
    assert runs.single_exit_code == 0
    assert runs.job.returncode == 0, runs.job.stderr[-3000:]
    assert runs.job.stdout.count(f"{EXPERIMENT}: test accuracy") == 1  # rank 0 prints, rank 1 does not
    assert sorted(p.name for p in runs.two.iterdir()) == sorted(p.name for p in runs.one.iterdir())


def test_test_and_validation_metrics_equal_single_process(runs):
    single = json.loads((runs.one / "metrics.json").read_text())
    job = json.loads((runs.two / "metrics.json").read_text())
    assert (job["pipeline"]["processes"], single["pipeline"]["processes"]) == (2, 1)
    for key in ("epochs_run", "best_epoch", "stopped_early", "config", "dataset"):
        assert job[key] == single[key], key
    assert_close(single["best_val"], job["best_val"], "best_val")
    assert_close(single["test"], job["test"], "test")
    single_logits, job_logits = np.load(runs.one / "test_logits.npz"), np.load(runs.two / "test_logits.npz")
    assert len(job_logits["labels"]) == 15  # the padding added to shard 15 images over 2 ranks is gone
    np.testing.assert_array_equal(job_logits["labels"], single_logits["labels"])  # dataset order restored
    np.testing.assert_allclose(job_logits["logits"], single_logits["logits"], rtol=1e-5, atol=1e-5)


def test_history_and_trained_weights_equal_single_process(runs):
    single, job = read_history(runs.one / "history.csv"), read_history(runs.two / "history.csv")
    assert_close(single, job, "history")
    single_state = torch.load(runs.one / "checkpoints" / "best.pt", weights_only=True)["model"]
    job_state = torch.load(runs.two / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert job_state.keys() == single_state.keys()  # the unwrapped model: loads in any number of processes
    for key, value in single_state.items():
        torch.testing.assert_close(job_state[key], value, rtol=1e-5, atol=1e-6, msg=key)


def written(runs: Runs, rank: str) -> list[Path]:
    """Files the given rank of the torchrun job wrote inside the test's folder."""
    log = Path(f"{runs.base / 'writes'}.rank{rank}")
    assert log.exists(), f"no write log for rank {rank}: the logging hook did not run"
    return [Path(line) for line in log.read_text().splitlines() if Path(line).is_relative_to(runs.base)]


def test_only_rank_zero_writes_files_and_the_image_cache(runs):
    rank0, rank1 = written(runs, "0"), written(runs, "1")
    assert rank1 == []
    names = {path.name for path in rank0}
    assert {"best.pt", "last.pt", "history.csv", "metrics.json", "test_logits.npz", "curves.png"} <= names
    cache_entries = {path for path in rank0 if path.suffix == ".u8" and not path.name.startswith(".")}
    per_side = collections.Counter(path.parent.parent.name for path in cache_entries)
    # every image decoded once, by rank 0: at the training side and at the audit's 256 px
    assert sorted(per_side.values()) == [32 + 11 + 15] * 2 and f"v{FORMAT_VERSION}-256px" in per_side
    assert written(runs, "-") == []  # nor did the torchrun launcher


def test_ranks_batches_together_are_the_single_process_batch():
    """perm[rank::world] with batch / world per rank: batch i of the ranks together is batch i of one
    process, for the shuffled training order and the evaluation order alike."""
    dataset = DeviceDataset(torch.arange(32).view(32, 1), torch.arange(32))
    for shuffle in (True, False):
        single = [labels for _, labels in DeviceLoader(dataset, 8, shuffle, CPU, seed=7)]
        ranks = [[labels for _, labels in DeviceLoader(dataset, 4, shuffle, CPU, 7, rank, 2)]
                 for rank in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == len(single) == 4
        for index, batch in enumerate(single):
            together = torch.cat([ranks[0][index], ranks[1][index]])
            assert sorted(together.tolist()) == sorted(batch.tolist())
    other_epoch = [labels for _, labels in DeviceLoader(dataset, 8, True, CPU, seed=8)]
    assert not torch.equal(torch.cat(other_epoch), torch.cat(single))


def test_image_and_device_loaders_draw_the_same_order():
    """The DataLoader path (no image cache) uses the same sampler, so both paths shard alike."""
    images, labels = torch.zeros(13, 1), torch.arange(13)
    from_loader = torch.cat([y for _, y in make_loader(TensorDataset(images, labels), 4, True, CPU, 5)])
    from_device = torch.cat([y for _, y in make_loader(DeviceDataset(images, labels), 4, True, CPU, 5)])
    assert torch.equal(from_loader, from_device) and sorted(from_loader.tolist()) == list(range(13))


def test_global_batch_must_divide_over_the_processes(monkeypatch):
    assert distributed.per_rank_batch(8) == 8 and distributed.world_size() == 1 and distributed.is_main()
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    assert distributed.per_rank_batch(12) == 4
    with pytest.raises(ValueError, match="--batch-size 8 is the global batch.*3 processes"):
        distributed.per_rank_batch(8)
