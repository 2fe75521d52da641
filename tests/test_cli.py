"""The command line as people expect it: answers before the heavy imports, help with defaults, --version,
one-line errors and warnings, and a way to continue after Ctrl-C."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from cxr import cli
from cxr.cli import build_parser, join_negative_numbers, main
from cxr.config import EXPERIMENTS

REPOSITORY = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "seaborn", "scipy", "sklearn", "matplotlib")

PROBE = """
import json, sys
from cxr.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def run_without_torch(*args: str, cwd: Path = REPOSITORY) -> dict:
    """Run ``cxr ARGS`` in a fresh interpreter; return its exit code, the heavy modules it imported, stderr."""
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPOSITORY / "src")}, timeout=60)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {**report, "stderr": result.stderr}


@pytest.mark.parametrize("args", [
    ["list"], ["--help"], ["train", "--help"], ["evaluate", "--help"], ["predict", "--help"], ["audit", "--help"],
    ["report", "--assets", "nowhere"], ["--version"],
])
def test_light_commands_import_no_heavy_library(args):
    assert run_without_torch(*args)["heavy"] == []


@pytest.mark.parametrize("args, message", [
    (["train", "resnet50_full", "--data-dir", "/missing"], "Data folder '/missing' does not exist"),
    (["train", "resnet50_full", "--device", "foo"], "--device 'foo' is not a device"),
    (["train", "vit_b16_head", "--image-size", "100"], "does not suit vit_b_16: it cuts the image into 16 px patches, so the size must be a multiple of 16 (e.g. 96)"),
    (["train", "resnet50_full", "--image-size", "100000"], "outside 32-1024 px"),
    (["train", "resnet50_full", "--image-size", "1"], "outside 32-1024 px"),
    (["train", "resnet50_full", "--out", "README.md"], "--out 'README.md' is a file"),
    (["evaluate", "--checkpoint", "/missing.pt"], "--checkpoint '/missing.pt' does not exist"),
    (["evaluate", "--checkpoint", "src"], "is a folder (an export?)"),
    (["predict", "x.png", "--checkpoint", "README.md", "--cam", "README.md"], "--cam 'README.md' is a file"),
    (["predict", "x.png", "--checkpoint", "README.md", "--csv", "src"], "--csv 'src' is a folder"),
    (["audit", "--out", "README.md"], "--out 'README.md' is a file"),
])
def test_bad_arguments_are_refused_before_torch_is_imported(args, message):
    report = run_without_torch(*args)
    assert report["code"] == 1 and report["heavy"] == []
    assert report["stderr"].startswith("error: ") and message in report["stderr"]
    assert "Traceback" not in report["stderr"]


def test_an_out_under_a_file_cannot_be_written():
    report = run_without_torch("train", "resnet50_full", "--out", "README.md/runs")
    assert report["code"] == 1 and "cannot be written" in report["stderr"]
    assert "README.md' is a file" in report["stderr"]


def test_a_negative_number_reaches_the_flags_own_check(capsys):
    assert join_negative_numbers(["train", "x", "--lr", "-1e-3", "--seed", "3"]) == [
        "train", "x", "--lr=-1e-3", "--seed", "3"]
    with pytest.raises(SystemExit):
        main(["train", "resnet50_full", "--lr", "-1e-3"])
    assert "argument --lr: must be greater than 0, got -1e-3" in capsys.readouterr().err


def test_every_train_flag_has_help_and_shows_the_experiments_defaults():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    titles = [group.title for group in train._action_groups]
    assert {"what to train", "data", "how it runs", "where results go"} <= set(titles)
    for action in train._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help text"
    text = train.format_help()
    epochs = ", ".join(f"{e.name} {e.epochs}" for e in EXPERIMENTS.values())
    assert f"(default: {epochs})" in " ".join(text.split())
    assert "smoothing of the weighted cross-entropy (default: 0.1)" in " ".join(text.split())  # shared: shown once


def test_train_flags_are_the_experiments_fields():
    """A hyperparameter is written once, in cxr.config: the flag exists because the field is tunable."""
    args = build_parser().parse_args(["train", "resnet50_full", "--weight-decay", "0.01", "--no-augment"])
    overrides = cli.hyperparameters(args)
    assert overrides["weight_decay"] == 0.01 and overrides["augment"] is False and overrides["epochs"] is None


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("cxr ")


def test_evaluate_takes_the_experiment_from_the_checkpoint():
    assert build_parser().parse_args(["evaluate", "--checkpoint", "best.pt"]).experiment is None


def test_ctrl_c_says_how_to_continue(tmp_path, monkeypatch, capsys):
    """Interrupted outside the epochs (the audit, the final evaluation): a run with a saved epoch resumes, any
    other command is simply run again."""
    def interrupted(args, argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    out = tmp_path / "runs"
    argv = ["train", "resnet50_full", "--out", str(out), "--weights", "none"]
    assert main(argv) == 130
    assert "Run it again with: cxr train resnet50_full" in capsys.readouterr().err
    (out / "resnet50_full" / "checkpoints").mkdir(parents=True)
    (out / "resnet50_full" / "checkpoints" / "last.pt").write_bytes(b"")
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().endswith(f"Resume with: cxr train resnet50_full --out {out} --weights none "
                                                    "--resume")


def test_warnings_are_one_line_while_the_command_runs(monkeypatch):
    """Python's format names the file and line of the warning call; a user needs the message alone."""
    shown = []

    def warn(args, argv):
        shown.append(warnings.formatwarning("Skipped 2 unusable file(s).", UserWarning, "/src/cxr/data/dataset.py", 9))
        return 0

    monkeypatch.setattr(cli, "_run", warn)
    before = warnings.formatwarning
    assert main(["evaluate", "--checkpoint", "README.md"]) == 0
    assert shown == ["warning: Skipped 2 unusable file(s).\n"]
    assert warnings.formatwarning is before  # restored: a caller's (or pytest's) warnings are left alone
