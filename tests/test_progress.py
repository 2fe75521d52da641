"""Progress bars in a notebook run from a terminal are text lines, not a widget papermill logs only as "0%"."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from tqdm import std

from cxr.common import progress


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.delenv("CXR_PROGRESS", raising=False)
    progress.text_in_notebook.cache_clear()
    yield monkeypatch
    progress.text_in_notebook.cache_clear()


class WidgetBar(std.tqdm):
    """Stands for tqdm.notebook's bar (the kind tqdm.auto picks in a kernel)."""


def test_a_kernel_under_papermill_gets_text_bars(fresh):
    fresh.setattr(progress, "auto_tqdm", WidgetBar)
    fresh.setenv("CXR_PROGRESS", "text")
    bar = progress.tqdm(range(3), file=io.StringIO())
    assert type(bar) is std.tqdm and bar.mininterval == progress.TEXT_INTERVAL_S
    progress.text_in_notebook.cache_clear()
    fresh.setenv("CXR_PROGRESS", "widget")
    assert type(progress.tqdm(range(3), disable=True)) is WidgetBar


def test_papermill_is_recognised_as_the_parent_process(fresh, tmp_path):
    probe = "from cxr.common.progress import text_in_notebook; print(text_in_notebook())"
    launcher = tmp_path / "papermill"  # a process named like papermill's, starting the "kernel"
    launcher.write_text(f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {probe!r}], check=True)\n")
    under_papermill = subprocess.run([sys.executable, str(launcher)], capture_output=True, text=True, check=True)
    elsewhere = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert (under_papermill.stdout.strip(), elsewhere.stdout.strip()) == ("True", "False")
