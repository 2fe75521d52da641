"""benchmarks/gpu_check.py: its --smoke run (the same steps as on a GPU, tiny, on the CPU) and its failures."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxr.config import EXPERIMENTS

REPOSITORY = Path(__file__).resolve().parents[1]
SCRIPT = REPOSITORY / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY / "src"), **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=environment,
                          cwd=REPOSITORY, timeout=1200)


# The smoke run takes every kind of step with one fully trained and one frozen-backbone experiment (each
# experiment's own paths are trained in test_training.py and test_cuda_paths.py); that every configured
# experiment is planned is checked on the plan itself.
SMOKE_EXPERIMENTS = ("mobilenet_v2_full", "mobilenet_v2_head")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    return _run("--smoke", "--out", str(out), "--experiments", *SMOKE_EXPERIMENTS), out


def test_the_plan_runs_every_step_for_every_configured_experiment(tmp_path):
    gpu_check = _load()
    args = gpu_check.parse_args(["--smoke"])
    names = [step["name"] for step in gpu_check.plan(args, tmp_path, tmp_path, True, tmp_path / "external")]
    for experiment in EXPERIMENTS:
        assert [f"train {experiment}", f"evaluate --tta {experiment}", f"predict {experiment}",
                f"evaluate --external {experiment}"] == [n for n in names if n.endswith(f" {experiment}")
                                                         and "host-memory" not in n]
    assert names[-1] == "train --splits-in-host-memory resnet50_full" and len(names) == 4 * len(EXPERIMENTS) + 1


def test_the_host_memory_run_is_resnet50_where_planned_else_the_first_fully_trained_one():
    gpu_check = _load()
    assert gpu_check.host_memory_experiment(list(EXPERIMENTS)) == "resnet50_full"
    assert gpu_check.host_memory_experiment(["mobilenet_v2_head", "mobilenet_v2_full"]) == "mobilenet_v2_full"
    assert gpu_check.host_memory_experiment(["resnet152_head", "vit_b16_head"]) is None


def test_smoke_runs_every_step(smoke):
    result, out = smoke
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["smoke"] is True and summary["torch"]
    names = [step["name"] for step in summary["steps"]]
    for experiment in SMOKE_EXPERIMENTS:
        assert [f"train {experiment}", f"evaluate --tta {experiment}", f"predict {experiment}",
                f"evaluate --external {experiment}"] == [n for n in names if n.endswith(f" {experiment}")
                                                         and "host-memory" not in n]
    assert names[-1] == "train --splits-in-host-memory mobilenet_v2_full"  # ResNet50's step where it is planned
    assert all(step["exit_status"] == 0 and step["seconds"] > 0 for step in summary["steps"])


def test_smoke_writes_the_assets_layout(smoke):
    _, out = smoke
    for experiment in SMOKE_EXPERIMENTS:
        metrics = json.loads((out / "assets" / experiment / "metrics.json").read_text())
        assert metrics["epochs_run"] == 1 and metrics["pipeline"]["device"].startswith("cpu")
        assert (out / "assets" / experiment / "curves.png").stat().st_size > 0
        (evaluation,) = (out / "evaluate" / experiment / "evaluations").iterdir()
        evaluated = json.loads((evaluation / "classification_report.json").read_text())
        assert "tta" in evaluated
        table = (out / "predict" / f"{experiment}.csv").read_text().splitlines()
        assert table[0].startswith("file,prediction,probability") and len(table) == 1 + 4  # one image a class
        external = json.loads((out / "assets" / experiment / "external" / "sample-external" / "metrics.json").read_text())
        planted = 4 * _load().PLANTED_PER_CLASS  # training images copied into the external folder
        assert external["overlaps"]["count"] == planted and external["test_without_overlaps"] is not None
        assert external["external"]["ignored_folders"] == [] and external["external"]["absent_classes"] == []
    host = json.loads((out / "host-memory" / "mobilenet_v2_full" / "metrics.json").read_text())
    assert host["epochs_run"] == 1 and host["pipeline"]["splits_on_device"] is False


def test_a_failed_step_is_reported_and_the_others_kept(tmp_path, monkeypatch):
    """A step that fails (here: a training run refused for a bad flag value) is marked failed, the steps
    that need its checkpoint are skipped, the others still run, and the exit status is non-zero."""
    gpu_check = _load()
    monkeypatch.setattr(gpu_check, "SMOKE_FLAGS", [*gpu_check.SMOKE_FLAGS, "--patience", "-1"])
    monkeypatch.setattr(sys, "path", [str(REPOSITORY / "src"), *sys.path])
    code = gpu_check.main(["--smoke", "--out", str(tmp_path), "--experiments", "resnet50_full"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert code == 1 and summary["status"] == "failed"
    statuses = {step["name"]: step["status"] for step in summary["steps"]}
    assert statuses == {"train resnet50_full": "failed", "evaluate --tta resnet50_full": "skipped",
                        "predict resnet50_full": "skipped", "evaluate --external resnet50_full": "skipped",
                        "train --splits-in-host-memory resnet50_full": "failed"}
    assert "patience" in summary["steps"][0]["error"]


def test_missing_gpu_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine, whatever it has
    assert _load().main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: --device cuda was requested but no CUDA GPU is available") and "Traceback" not in error
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["status"] == "failed"


def test_a_killed_check_says_where_it_stopped(tmp_path):
    """SIGTERM while a step runs: the step is marked interrupted, the summary says where, the exit status is 1."""
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY / "src")}
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], cwd=REPOSITORY,
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    summary_path = tmp_path / "summary.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if summary_path.exists() and any(s["status"] == "running" for s in json.loads(summary_path.read_text())["steps"]):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    summary = json.loads(summary_path.read_text())
    assert process.returncode == 1 and "Traceback" not in stderr
    assert summary["status"] == "interrupted" and summary["error"] == "interrupted during train resnet152_head"
    assert summary["steps"][0]["status"] == "interrupted"
    assert "interrupted during train resnet152_head" in stderr
