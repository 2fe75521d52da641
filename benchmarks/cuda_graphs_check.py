"""Does training with CUDA graphs give the run without them? (GPU only; tests/test_cuda_paths.py checks the logic
around the capture on the CPU.)

    PYTHONPATH=src python benchmarks/cuda_graphs_check.py --data-dir device_data/cxr-sample --epochs 3

Fits ``resnet50_full`` twice on the same data and seed, with and without ``Runtime.cuda_graphs``, and prints
both histories (each epoch with its seconds) and their largest differences. They may differ by run-to-run
noise where cuDNN's backward kernels add in no fixed order; on an H200 at ``abec2fc`` they were identical
(``cuda_graphs_check.json``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from cxr.train import engine
from cxr.config import get_experiment
from cxr.data.dataset import load_splits
from cxr.data.layout import DatasetError
from cxr.common.runtime import Runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write both histories here as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: CUDA graphs need a CUDA GPU, and none is available here.")
    try:
        splits = load_splits(args.data_dir)
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from None
    experiment = get_experiment("resnet50_full", epochs=args.epochs, weights="none", patience=0)
    histories = {}
    with tempfile.TemporaryDirectory() as work:
        for graphs in (False, True):
            runtime = Runtime.create(cache_dir=Path(work) / "cache", progress=False, cuda_graphs=graphs)
            result = engine.fit(experiment, splits, Path(work) / f"graphs-{graphs}", runtime, seed=0)
            histories["with CUDA graphs" if graphs else "without"] = result.history
    for name, history in histories.items():
        print(name)
        for row in history:
            print("  " + ", ".join(f"{key} {value:.4f}" for key, value in row.items()))
    for key in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1"):
        pairs = zip(histories["without"], histories["with CUDA graphs"])
        print(f"largest difference in {key}: {max(abs(a[key] - b[key]) for a, b in pairs):.4g}")
    if args.out:
        args.out.write_text(json.dumps(histories, indent=2) + "\n")


if __name__ == "__main__":
    main()
