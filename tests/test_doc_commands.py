"""Every `cxr` command in a fenced block of README.md or docs/*.md still parses: a flag renamed or removed,
an experiment renamed or a choice dropped fails here, not for a reader copying the command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cxr.cli import build_parser, join_negative_numbers
from cxr.config import EXPERIMENTS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(?:bash|sh|shell|console)?\n(.*?)```", re.DOTALL)
SUBCOMMANDS = "|".join(build_parser()._subparsers._group_actions[0].choices)
CXR = re.compile(rf"(?:^|\s)cxr\s+((?:{SUBCOMMANDS}|-h|--help|--version)(?:\s.*)?)$")
# Placeholders the docs use for a value the reader fills in, and what stands in for them here.
PLACEHOLDERS = {"EXPERIMENT": next(iter(EXPERIMENTS)), "$experiment": next(iter(EXPERIMENTS))}


def fenced_cxr_commands(text: str) -> list[str]:
    """The argument lists after ``cxr`` in every fenced shell line (continuations joined, prompts and comments
    dropped, chains split at ``&&``, ``;`` and ``|``)."""
    commands = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("#"):
                continue
            for part in re.split(r"&&|;|\|", line.split(" #")[0]):
                found = CXR.search(part.strip())
                if found and not part.strip().startswith(("import", "from")):
                    commands.append(found.group(1).strip())
    return commands


def parse_problem(arguments: str) -> str | None:
    """None when ``cxr <arguments>`` parses, else argparse's message."""
    words = [PLACEHOLDERS.get(word, word) for word in shlex.split(arguments)]
    try:
        build_parser().parse_args(join_negative_numbers(words))
    except SystemExit as error:
        return f"exit {error.code}"
    return None


ALL = [(path.relative_to(ROOT).as_posix(), command) for path in DOCS for command in fenced_cxr_commands(path.read_text())]


def test_the_docs_hold_many_cxr_commands():
    assert len(ALL) >= 15 and {"README.md", "docs/export.md", "docs/predict.md"} <= {where for where, _ in ALL}


@pytest.mark.parametrize(("where", "command"), ALL, ids=[f"{w}:{c[:40]}" for w, c in ALL])
def test_every_documented_cxr_command_parses(where, command, capsys):
    assert parse_problem(command) is None, (where, command, capsys.readouterr().err)


def test_a_command_that_no_longer_parses_is_caught(capsys):
    text = "```bash\nuv run cxr train resnet50_full --epochs 2 \\\n  --no-such-flag  # old\n```\n"
    [command] = fenced_cxr_commands(text)
    assert command.split() == ["train", "resnet50_full", "--epochs", "2", "--no-such-flag"]
    assert parse_problem(command) == "exit 2" and "--no-such-flag" in capsys.readouterr().err
    assert parse_problem("train resnet18") == "exit 2"  # an experiment that does not exist


def test_readme_runs_python_through_uv():
    """uv is the only set-up: a bare ``python3`` lacks the packages (``No module named torch``)."""
    lines = [line for block in FENCE.findall((ROOT / "README.md").read_text()) for line in block.splitlines()]
    bare = [line for line in lines if re.search(r"(^|[\s;])python3?\s", line) and "uv run python" not in line]
    assert bare == []
