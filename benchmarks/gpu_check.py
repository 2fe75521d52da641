"""One script for whoever has a GPU for a few minutes: every configured experiment at its full budget
(its test evaluation runs the shortcut checks, AUROC and operating points), then with each checkpoint
``cxr evaluate --tta``, ``cxr predict --csv --cam`` and ``cxr evaluate --external`` on a folder built from
the data's test split with some training images planted in it; last, one short training run with
``--splits-in-host-memory`` (the per-batch host copy that a split too large for the GPU takes). Every result
is in the ``assets/`` layout.

On a GPU machine with torch, torchvision, numpy, pandas, matplotlib, seaborn, scikit-learn and tqdm (no
install of this project needed; grad-cam is optional, its figures are skipped without it)::

    PYTHONPATH=src python3 benchmarks/gpu_check.py --data-dir DATA_DIR --out gpu-check [--weights none]

Each step runs as its own ``python -m cxr`` process, so one failure (out of memory, say) leaves the other
steps' results; ``OUT/summary.json`` (device, torch, commit, each step's command, exit status and seconds)
is rewritten before and after every step, so a run killed midway still says which step it was in. The
exit status is non-zero when any step failed. ``--smoke`` runs the same steps on the CPU with tiny
settings on a synthetic dataset (that is what CI runs), each through ``cxr.cli.main`` in this process:
the same commands, with torch imported once instead of nine times.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "src"))  # cxr.config is plain data: readable without the project installed
from cxr.config import EXPERIMENTS as CONFIGURED  # noqa: E402

EXPERIMENTS = tuple(CONFIGURED)
SMOKE_COUNTS = {"train": 8, "val": 2, "test": 2}  # images per class: a test image of every class to predict
SMOKE_FLAGS = ["--epochs", "1", "--batch-size", "8", "--image-size", "32", "--device", "cpu"]
PREDICT_IMAGES_PER_CLASS = 1
PLANTED_PER_CLASS = 2  # training images planted in the external folder: its audit must find them
EXTERNAL_SPELLING = {"COVID19": "COVID-19", "NORMAL": "Normal", "PNEUMONIA": "Pneumonia", "TUBERCULOSIS": "Tuberculosis"}
HOST_MEMORY_EXPERIMENT, HOST_MEMORY_EPOCHS = "resnet50_full", "2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="Kaggle-layout dataset folder (required unless --smoke)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="results folder (default: gpu-check)")
    parser.add_argument("--weights", default="imagenet", help="imagenet (default), none, or a .pth file")
    parser.add_argument("--device", default="cuda", help="default: cuda (cpu with --smoke)")
    parser.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    parser.add_argument("--smoke", action="store_true",
                        help="the same steps on the CPU, tiny settings, on a synthetic dataset written to --out")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.weights = "cpu", "none"
    elif args.data_dir is None:
        parser.error("--data-dir is required (or --smoke for the synthetic CPU run)")
    return args


def environment(device: str) -> dict[str, Any]:
    """Where the check ran: device, library versions, commit (``CXR_COMMIT`` where there is no git)."""
    import torch

    from cxr.common.runtime import device_name
    from cxr.data.provenance import git_commit

    return {
        "device": device_name(torch.device(device)) if device != "cuda" or torch.cuda.is_available() else "no CUDA GPU",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(REPOSITORY),
        "grad_cam": importlib.util.find_spec("pytorch_grad_cam") is not None,
    }


def predict_inputs(data_dir: Path, per_class: int = PREDICT_IMAGES_PER_CLASS) -> list[Path]:
    """The first ``per_class`` test images of every class."""
    from cxr.data.dataset import scan_split
    from cxr.data.layout import find_split_root

    root = find_split_root(data_dir)
    if root is None:
        return []
    test = scan_split(root, "test", check=False)
    chosen: dict[int, list[Path]] = {}
    for path, label in zip(test.paths, test.labels):
        chosen.setdefault(label, [])
        if len(chosen[label]) < per_class:
            chosen[label].append(path)
    return [path for label in sorted(chosen) for path in chosen[label]]


def external_folder(data_dir: Path, folder: Path, planted: int = PLANTED_PER_CLASS) -> Path:
    """A folder "from elsewhere" for ``cxr evaluate --external``: the test split's images under the common
    spellings of the class names (``COVID-19``, ``Tuberculosis``, ...), plus the first ``planted`` training
    images of each class, which its near-duplicate audit must report as overlaps."""
    import shutil

    from cxr.data.dataset import scan_split
    from cxr.data.layout import find_split_root

    root = find_split_root(data_dir)
    test, train = scan_split(root, "test", check=False), scan_split(root, "train", check=False)
    for label, name in enumerate(EXTERNAL_SPELLING.values()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for path in (p for p, k in zip(test.paths, test.labels) if k == label):
            shutil.copy2(path, folder / name / path.name)
        for path in [p for p, k in zip(train.paths, train.labels) if k == label][:planted]:
            shutil.copy2(path, folder / name / f"planted-{path.name}")
    return folder


def plan(args: argparse.Namespace, data_dir: Path, out: Path, grad_cam: bool,
         external: Path | None = None) -> list[dict[str, Any]]:
    """Every step: a name, the ``cxr`` arguments, and the step it needs (its checkpoint)."""
    assets, cache = out / "assets", out / "cache"
    common = ["--data-dir", str(data_dir), "--device", args.device, "--quiet", "--cache-dir", str(cache)]
    train_flags = ["--weights", args.weights, *(SMOKE_FLAGS if args.smoke else [])]
    images = [str(path) for path in predict_inputs(data_dir)]
    steps = []
    for name in args.experiments:
        checkpoint = str(assets / name / "checkpoints" / "best.pt")
        steps.append({"name": f"train {name}", "args": ["train", name, "--out", str(assets), *common, *train_flags]})
        steps.append({"name": f"evaluate --tta {name}", "needs": f"train {name}",
                      "args": ["evaluate", name, "--checkpoint", checkpoint, "--tta", "--out", str(out / "evaluate"),
                               *common]})
        cam = ["--cam", str(out / "predict" / f"{name}-cam")] if grad_cam else []
        steps.append({"name": f"predict {name}", "needs": f"train {name}",
                      "note": None if grad_cam else "Grad-CAM skipped: the grad-cam package is not installed",
                      "args": ["predict", *images, "--checkpoint", checkpoint, "--csv",
                               str(out / "predict" / f"{name}.csv"), "--device", args.device, "--quiet", *cam]})
        if external is not None:
            steps.append({"name": f"evaluate --external {name}", "needs": f"train {name}",
                          "args": ["evaluate", "--checkpoint", checkpoint, "--external", str(external),
                                   "--out", str(assets), *common]})
    host = host_memory_experiment(args.experiments)
    if host is not None:
        flags = [*train_flags, "--epochs", HOST_MEMORY_EPOCHS] if not args.smoke else train_flags
        steps.append({"name": f"train --splits-in-host-memory {host}",
                      "args": ["train", host, "--splits-in-host-memory", "--no-tensorboard",
                               "--out", str(out / "host-memory"), *common, *flags]})
    return steps


def host_memory_experiment(experiments: list[str]) -> str | None:
    """The run with every split in host memory: ResNet50 where it is planned, else the first fully trained
    experiment planned (the smoke run's lighter one), else none."""
    full = [name for name in experiments if not CONFIGURED[name].freeze_backbone]
    return HOST_MEMORY_EXPERIMENT if HOST_MEMORY_EXPERIMENT in experiments else next(iter(full), None)


class Summary:
    """``summary.json``, rewritten after every change so that a killed run leaves an accurate one."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path, self.data = path, {**header, "steps": []}

    def write(self) -> None:
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text(json.dumps(self.data, indent=2))
        os.replace(temporary, self.path)

    def add(self, step: dict[str, Any]) -> dict[str, Any]:
        self.data["steps"].append(step)
        self.write()
        return step


def last_error(log: Path) -> str | None:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (errors or lines or [None])[-1]


INTERRUPTED = threading.Event()


def run_as_process(args: list[str], log: Path) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY / "src"), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as handle:
        return subprocess.run([sys.executable, "-m", "cxr", *args], stdout=handle, stderr=subprocess.STDOUT,
                              env=env, cwd=REPOSITORY).returncode


def run_in_process(args: list[str], log: Path) -> int:
    """``cxr ARGS`` through ``cxr.cli.main`` here, its output (and any traceback) into ``log``."""
    from cxr.cli import main as cxr

    with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        try:
            return cxr(args)
        except SystemExit as exit:  # argparse refused an argument
            return exit.code if isinstance(exit.code, int) else 1
        except Exception:  # noqa: BLE001  (a crash of one step is that step's failure, as with a process)
            traceback.print_exc()
            return 1


def run_step(step: dict[str, Any], summary: Summary, logs: Path, failed: set[str], in_process: bool = False) -> None:
    """Run one ``cxr`` step in its own process, recording its exit status, seconds and last error line."""
    record = summary.add({"name": step["name"], "command": "python -m cxr " + " ".join(step["args"]),
                          "status": "running", "exit_status": None, "seconds": None})
    if step.get("note"):
        record["note"] = step["note"]
    if step.get("needs") in failed:
        record.update(status="skipped", note=f"{step['needs']} failed")
        failed.add(step["name"])
        summary.write()
        return
    log = logs / (step["name"].replace(" ", "_").replace("--", "") + ".log")
    started = time.perf_counter()
    code = (run_in_process if in_process else run_as_process)(step["args"], log)
    if INTERRUPTED.is_set():  # a kill during an in-process step ended that step: the whole check stops here
        raise KeyboardInterrupt
    record.update(exit_status=code, seconds=round(time.perf_counter() - started, 1),
                  status="ok" if code == 0 else "failed", log=str(log))
    if code != 0:
        failed.add(step["name"])
        record["error"] = last_error(log)
        print(f"  {step['name']} failed (exit {code}): {record['error']}", file=sys.stderr, flush=True)
    summary.write()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPOSITORY / "src"))
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    info = environment(args.device)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # the smoke data and the external folder; removed at the end
    try:
        return check(args, out, info, scratch, argv)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check(args: argparse.Namespace, out: Path, info: dict, scratch: Path, argv: list[str] | None) -> int:
    data_dir = args.data_dir
    if args.smoke:
        from cxr.data.synthetic import write_synthetic_dataset

        data_dir = write_synthetic_dataset(scratch / "chest_xray", SMOKE_COUNTS, bad_files=False)
    summary = Summary(out / "summary.json", {
        "command": "PYTHONPATH=src python3 benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **info, "data_dir": str(data_dir), "weights": args.weights, "smoke": args.smoke,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "status": "running", "seconds": None,
    })
    if info["device"] == "no CUDA GPU":
        summary.data.update(status="failed", error="--device cuda was requested but no CUDA GPU is available")
        summary.write()
        print("error: --device cuda was requested but no CUDA GPU is available; run it on a GPU machine, "
              "or use --smoke for the CPU run.", file=sys.stderr)
        return 1
    started, failed = time.perf_counter(), set()

    def stop(signum, frame):  # a kill: say where it stopped, keep what is done
        INTERRUPTED.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        external = external_folder(Path(data_dir), scratch / "sample-external")
        for step in plan(args, Path(data_dir), out, info["grad_cam"], external):
            print(f"[{time.strftime('%H:%M:%S')}] {step['name']}", flush=True)
            run_step(step, summary, out / "logs", failed, in_process=args.smoke)
        summary.data["status"] = "failed" if failed else "ok"
    except KeyboardInterrupt:
        running = [s["name"] for s in summary.data["steps"] if s["status"] == "running"]
        for step in summary.data["steps"]:
            if step["status"] == "running":
                step["status"] = "interrupted"
        summary.data.update(status="interrupted", error=f"interrupted during {', '.join(running) or 'setup'}")
        print(f"\ninterrupted during {', '.join(running) or 'setup'}; finished steps are kept in {out}",
              file=sys.stderr)
    summary.data["seconds"] = round(time.perf_counter() - started, 1)
    summary.write()
    done = sum(s["status"] == "ok" for s in summary.data["steps"])
    print(f"{done} of {len(summary.data['steps'])} steps ok in {summary.data['seconds']} s; summary: {out / 'summary.json'}")
    return 0 if summary.data["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
