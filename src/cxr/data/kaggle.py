# Installs the cxr package when it is missing, e.g. in a Kaggle notebook uploaded on its own: from a
# cxr-*.whl under the input root (/kaggle/input, or CXR_KAGGLE_INPUT), else from the repository's URL.
# Standard library only: it runs before cxr exists. Each notebook's first code cell is a copy of
# src/cxr/data/kaggle.py (tests/test_kaggle.py checks; cxr.notebook.write_bootstrap_cells updates them).
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPOSITORY_URL = None  # [project.urls] Repository in pyproject.toml (None: not published); tests keep them equal
PIP_INSTALL = (sys.executable, "-m", "pip", "install", "--quiet")


class BootstrapError(RuntimeError):
    """cxr could not be installed; the message says how to attach the wheel."""


def find_wheels(input_root):
    """The cxr wheels up to four folders below ``input_root``, newest first."""
    root = Path(input_root)
    wheels = {path for depth in range(5) for path in root.glob("*/" * depth + "cxr-*.whl")}
    return sorted(wheels, key=lambda path: path.stat().st_mtime, reverse=True)


def _pip(spec, pip):
    result = subprocess.run([*pip, spec], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"pip could not install {spec}:\n{(result.stderr or result.stdout).strip()}", file=sys.stderr)
    return result.returncode == 0


def install_cxr(input_root=None, repository_url=REPOSITORY_URL, pip=PIP_INSTALL):
    """Install cxr from the newest wheel under the input root, else from ``repository_url``; return what
    was installed. Raise BootstrapError with the steps to attach the wheel when neither works."""
    root = Path(input_root or os.environ.get("CXR_KAGGLE_INPUT") or "/kaggle/input")
    wheels = find_wheels(root) if root.is_dir() else []
    sources = [str(wheels[0])] if wheels else []
    sources += [f"git+{repository_url}"] if repository_url else []
    for source in sources:
        print(f"Installing cxr from {source} ...")
        if _pip(source, pip):
            importlib.invalidate_caches()
            return source
    tried = f"tried {', '.join(sources)}" if sources else f"no cxr-*.whl under {root} and no repository URL known"
    raise BootstrapError(
        f"cxr is not installed ({tried}). Build the wheel where you have the repository (`uv build --wheel`), "
        "upload dist/cxr-*.whl as a Kaggle dataset, attach it to this notebook (Add Input) and run this cell "
        "again (with Internet on if pip must fetch dependencies that Kaggle lacks)."
    )


def ensure_cxr(input_root=None, repository_url=REPOSITORY_URL, pip=PIP_INSTALL):
    """Install cxr unless it can already be imported; return what was installed (None: nothing)."""
    if importlib.util.find_spec("cxr") is not None:
        return None
    return install_cxr(input_root, repository_url, pip)
