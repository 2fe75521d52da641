"""How fast the three experiments train, against the hardware's ceiling and the typical notebook pipeline.

One command on the GPU machine, from the repository root (no install: the package is on PYTHONPATH)::

    PYTHONPATH=src python benchmarks/benchmark.py --source device_data/cxr-sample

It builds a Kaggle-sized training set (6,326 images in the Kaggle class proportions, plus a 771-image
test split) by upscaling the source images to Kaggle-like resolution and re-encoding them as JPEG, so
decoding costs what it costs on the real data. Then, for each experiment, on the same data:

1. ours, end to end (scan, decoded-image cache, ``engine.fit`` with early stopping off, test
   predictions), the experiments one after the other with one image cache that is empty for the first
   (cold) and read by the others (warm), before anything else runs on the device;
2. ceiling: training steps per second on synthetic tensors already on the device (our step: bf16
   autocast, channels_last, fused AdamW, fit's loss, CUDA graphs for a fully trained network; a frozen
   backbone forward-only, on 256 images at once), and the variants the defaults were chosen against;
3. seed-style: the typical notebook pipeline (fp32, PIL decode and torchvision transforms every epoch
   in 4 DataLoader workers, backbone in train mode, ``.item()`` every step), one epoch measured and
   extrapolated to the experiment's epoch budget;
4. a profile of the second epoch of a two-epoch run of each experiment, and the ceilings with
   ``torch.compile``.

It writes ``results.md`` and ``results.json`` into ``--out`` (default ``benchmarks/``) after every
experiment, so a run cut short still leaves what it measured. ``--images``, ``--epochs``,
``--seed-steps`` and ``--experiments`` shrink it; see benchmarks/README.md.

This file runs the steps in that order and saves after each; what each step does is beside it:
``kaggle_sized.py`` builds the data set, ``measure.py`` times ours and the ceilings, ``seed_style.py`` the
notebook pipeline, and ``report.py`` judges the targets and writes the results.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torchvision

from cxr.data.cache import default_workers
from cxr.config import EXPERIMENTS, Experiment, get_experiment
from cxr.data.dataset import DataSplits, load_splits
from cxr.data.provenance import git_commit
from cxr.common.runtime import Runtime, device_name, select_device

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a file it is there already; loaded by importlib (the tests) it is not
    sys.path.insert(0, str(HERE))

# the steps, beside this file (imported once HERE is on sys.path)
from kaggle_sized import build_kaggle_sized
from measure import ceiling_variants, measure_ceiling, measure_our_loader, run_ours
from report import DEFAULT_WORK, targets, write_results
from seed_style import measure_seed_loader, measure_seed_style, seed_limit

PROFILE_CHOICES = ("missed", "all", "none")


def log(message: str) -> None:
    """A timestamped progress line, flushed at once so a log cut short by a timeout still shows it."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options; their defaults are the default work, which the targets are stated for."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("device_data/cxr-sample"),
                        help="Kaggle-layout folder whose images are upscaled (default: device_data/cxr-sample)")
    parser.add_argument("--data", type=Path, default=Path("device_data"),
                        help="where the Kaggle-sized set is written, and reused when complete (default: device_data)")
    parser.add_argument("--out", type=Path, default=HERE,
                        help="folder for results.md and results.json (default: benchmarks/)")
    parser.add_argument("--work", type=Path, help="scratch folder for caches and checkpoints (default: a temporary one)")
    parser.add_argument("--images", type=int, default=DEFAULT_WORK["images"],
                        help="training images, in the Kaggle class proportions (default: 6326)")
    parser.add_argument("--size", type=int, default=DEFAULT_WORK["size"],
                        help="mean shorter side of the JPEGs in px (default: 1600)")
    parser.add_argument("--experiments", nargs="+", choices=sorted(EXPERIMENTS),
                        default=list(DEFAULT_WORK["experiments"]),
                        help="default: the three original experiments, which the speed targets are for")
    parser.add_argument("--epochs", type=int, help="epoch budget for every experiment (default: each one's own)")
    parser.add_argument("--image-size", type=int, default=DEFAULT_WORK["image_size"])
    parser.add_argument("--batch-size", type=int, help="default: each experiment's own (64)")
    parser.add_argument("--device", help="cuda, cpu, ... (default: best available)")
    parser.add_argument("--seed-workers", type=int, default=4, help="DataLoader workers of the seed-style pipeline")
    parser.add_argument("--seed-steps", type=int, help="measure only this many seed-style training steps per "
                        "experiment and scale them to an epoch (default: the whole epoch)")
    parser.add_argument("--ceiling-steps", type=int, default=DEFAULT_WORK["ceiling_steps"],
                        help="timed steps of the ceiling (default: 30)")
    parser.add_argument("--compile-ceiling", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure the ceiling with torch.compile (default: on CUDA only)")
    parser.add_argument("--profile", choices=PROFILE_CHOICES, default="missed",
                        help="profile two epochs with torch.profiler: of each experiment that misses a target "
                        "(default), of every one, or of none")
    parser.add_argument("--threads", type=int, default=default_workers(), help="threads that build the data set")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The whole benchmark, step by step: ours first, while nothing else has touched the device; compiling last."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = select_device(args.device)
    if args.compile_ceiling is None:
        args.compile_ceiling = device.type == "cuda"
    work = args.work or Path(tempfile.mkdtemp(prefix="cxr-benchmark-"))
    try:
        bench = start(args, argv, device, work)
        time_ours(bench)
        time_ceilings_and_seed_style(bench)
        if args.profile != "none":
            time_profiles(bench)
        if args.compile_ceiling:
            time_compiled_ceilings(bench)
        bench.results["finished"] = True
        bench.save("benchmark")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print((args.out / "results.md").read_text())
    return bench.results


@dataclasses.dataclass
class Bench:
    """One benchmark run: what it measures on, and ``results``, which every step adds to and saves."""

    args: argparse.Namespace
    device: torch.device
    experiments: dict[str, Experiment]
    splits: DataSplits
    root: Path
    work: Path
    results: dict[str, Any]
    started: float

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        return self.results["experiments"]

    @property
    def cache_dir(self) -> Path:
        return self.work / "cache"

    def save(self, step: str) -> None:
        """Write results.md and results.json now, so that a run cut short keeps what it measured."""
        self.results["benchmark_seconds"] = round(time.perf_counter() - self.started, 1)
        write_results(self.results, self.args.out)
        log(f"{step}: done; results so far in {self.args.out / 'results.md'}")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the seconds spent inside to ``benchmark_phases[name]``: where the command's own time goes."""
        started = time.perf_counter()
        try:
            yield
        finally:
            phases = self.results["benchmark_phases"]
            phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - started, 2)


def start(args: argparse.Namespace, argv: list[str], device: torch.device, work: Path) -> Bench:
    """Build (or reuse) the Kaggle-sized set and the results' header: device, versions, commit, settings."""
    started = time.perf_counter()
    log(f"device {device_name(device)}; building the data set from {args.source}")
    data = build_kaggle_sized(args.source, args.data, args.images, args.size, args.threads)
    log(f"data set {'reused' if data['reused'] else 'built'}: {data['root']}")
    splits = load_splits(Path(data["root"]))
    experiments = {name: get_experiment(name, image_size=args.image_size, weights="none", patience=0,
                                        epochs=args.epochs, batch_size=args.batch_size) for name in args.experiments}
    results: dict[str, Any] = {
        "command": "PYTHONPATH=src python benchmarks/benchmark.py" + (" " + shlex.join(argv) if argv else ""),
        "device": device_name(device),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit() or "unknown (not a git checkout)",
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "data": {**data, "train_images_per_epoch": len(splits.train), "val_images": len(splits.val),
                 "test_images": len(splits.test)},
        "loader_alone": {},
        "experiments": {name: {"epochs": experiment.epochs} for name, experiment in experiments.items()},
        "benchmark_phases": {"data set": round(time.perf_counter() - started, 2)},
        "finished": False,
    }
    return Bench(args, device, experiments, splits, Path(data["root"]), work, results, started)


def time_ours(bench: Bench) -> None:
    """Ours end to end, the experiments one after the other, first: nothing else has run on the GPU yet."""
    for index, (name, experiment) in enumerate(bench.experiments.items()):
        row = bench.rows[name]
        row["cache"] = "cold" if index == 0 else "warm"
        log(f"{name}: ours, {row['cache']} image cache")
        with bench.phase("ours"):
            row["ours"] = run_ours(experiment, bench.root, bench.cache_dir, bench.work / "runs" / name, bench.device)
        shutil.rmtree(bench.work / "runs", ignore_errors=True)
        done = [row["ours"] for row in bench.rows.values() if "ours" in row]
        bench.results["totals"] = {"experiments": len(done),
                                   "ours": round(sum(r["experiment_seconds"] for r in done), 1)}
        bench.save(f"{name} (ours)")


def time_ceilings_and_seed_style(bench: Bench) -> None:
    """Each experiment's ceiling and its variants, then its seed-style epoch; both loaders alone."""
    args, loaders = bench.args, bench.results["loader_alone"]
    with bench.phase("loaders alone"):
        loaders["ours"] = measure_our_loader(next(iter(bench.experiments.values())), bench.splits, bench.cache_dir,
                                             bench.device)
    for name, experiment in bench.experiments.items():
        row = bench.rows[name]
        for key, (runtime, torch_loss) in ceiling_variants(experiment, bench.device).items():
            log(f"{name}: {key}")
            with bench.phase("ceilings"):
                row[key] = measure_ceiling(experiment, runtime, args.ceiling_steps, torch_loss=torch_loss)
        if "seed-style" not in loaders:
            log("seed-style DataLoader alone")
            with bench.phase("loaders alone"):
                loaders["seed-style"] = measure_seed_loader(bench.splits, experiment, args.seed_workers,
                                                            min(args.seed_steps or 20, 20))
        log(f"{name}: seed-style")
        torch.backends.cudnn.benchmark = False  # as in the notebooks
        with bench.phase("seed-style"):
            row["seed_style"] = measure_seed_style(experiment, bench.splits, bench.device, args.seed_workers,
                                                   args.seed_steps)
        row["seed_limit"] = seed_limit(row["seed_style"], loaders["seed-style"])
        if all("seed_style" in row for row in bench.rows.values()):
            bench.results["totals"]["seed_style"] = round(
                sum(row["seed_style"]["experiment_seconds"] for row in bench.rows.values()), 1)
        bench.save(f"{name} (ceilings, seed-style)")


def to_profile(results: dict[str, Any], choice: str) -> list[str]:
    """The experiments a profile must explain (``--profile missed``): those that miss one of their own
    targets, or all of them when a total misses; with ``all``, every one."""
    names = list(results["experiments"])
    if choice == "all":
        return names
    missed = [target for target, verdict in targets(results).items() if verdict.startswith("missed")]
    if any(not target.startswith(tuple(f"{name} " for name in names)) for target in missed):
        return names
    return [name for name in names if any(target.startswith(f"{name} ") for target in missed)]


def time_profiles(bench: Bench) -> None:
    """A two-epoch run of each experiment to profile (:func:`to_profile`) whose second epoch runs under
    torch.profiler."""
    names = bench.results["profiled"] = to_profile(bench.results, bench.args.profile)
    for name in names:
        experiment = bench.experiments[name]
        log(f"{name}: profiling its second epoch")
        with bench.phase("profiles"):
            bench.rows[name]["profiled"] = run_ours(
                dataclasses.replace(experiment, epochs=min(2, experiment.epochs)), bench.root, bench.cache_dir,
                bench.work / "runs" / name, bench.device, bench.args.out / "profiles" / f"{name}.txt")
        shutil.rmtree(bench.work / "runs", ignore_errors=True)
        bench.save(f"{name} (profile)")


def time_compiled_ceilings(bench: Bench) -> None:
    """The ceilings with torch.compile, last: compiling takes the longest."""
    for name, experiment in bench.experiments.items():
        log(f"{name}: ceiling with torch.compile")
        with bench.phase("compiled ceilings"):
            bench.rows[name]["ceiling_compiled"] = measure_ceiling(
                experiment, Runtime.create(bench.device, progress=False, compile=True), bench.args.ceiling_steps)
        bench.save(f"{name} (compiled ceiling)")


if __name__ == "__main__":
    main()
