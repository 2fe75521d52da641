"""A notebook uploaded alone to Kaggle: its first cell installs cxr from a wheel under the input root (else
from the repository's URL), and the settings find the attached dataset by its layout, whatever its name."""

import ast
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import nbformat
import pytest

from cxr.data import kaggle as kaggle_bootstrap
from cxr import notebook
from cxr.data.layout import DatasetError
from cxr.data.synthetic import write_synthetic_dataset

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted(ROOT.glob("*.ipynb"))
COUNTS = {"train": 4, "val": 1, "test": 1}


def uv() -> str:
    found = os.environ.get("UV") or shutil.which("uv")
    assert found, "uv is needed to build and install the wheel"
    return found


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory) -> Path:
    """The wheel `uv build --wheel` makes of this checkout (under a second)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([uv(), "build", "--wheel", "--quiet", "-o", str(out), str(ROOT)], check=True, capture_output=True)
    (wheel,) = out.glob("cxr-*.whl")
    return wheel


@pytest.fixture
def input_root(tmp_path, built_wheel) -> Path:
    """/kaggle/input with the wheel in one dataset and a renamed, nested copy of the data in another."""
    root = tmp_path / "input"
    (root / "my-cxr-wheel").mkdir(parents=True)
    shutil.copy(built_wheel, root / "my-cxr-wheel")
    write_synthetic_dataset(root / "forked-xrays-v2" / "Data", COUNTS, size=16, bad_files=False)
    return root


def target_install(target: Path) -> tuple[str, ...]:
    """pip's role, played by uv: install without dependencies into ``target`` (this venv stays as it is)."""
    return (uv(), "pip", "install", "--quiet", "--no-deps", "--python", sys.executable, "--target", str(target))


def test_wheel_under_input_root_installs_an_importable_package(input_root, tmp_path):
    target = tmp_path / "site"
    installed = kaggle_bootstrap.install_cxr(input_root, repository_url=None, pip=target_install(target))
    assert Path(installed).parent == input_root / "my-cxr-wheel"
    # cxr itself only: importing cxr.notebook (torch, matplotlib) would take seconds and test nothing more
    where = subprocess.run([sys.executable, "-c", "import cxr; print(cxr.__file__)"], check=True,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(target)})
    assert Path(where.stdout.strip()).is_relative_to(target)
    assert {"notebook.py", "workflow.py"} <= {p.name for p in (target / "cxr").iterdir()}
    assert (target / "cxr" / "data" / "kaggle.py").is_file()


def test_input_root_comes_from_the_environment(input_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_KAGGLE_INPUT", str(input_root))
    installed = kaggle_bootstrap.install_cxr(repository_url=None, pip=target_install(tmp_path / "site"))
    assert installed.endswith(".whl")


def test_ensure_cxr_installs_nothing_when_cxr_imports(tmp_path):
    assert kaggle_bootstrap.ensure_cxr(tmp_path / "missing", pip=("false",)) is None


def test_broken_wheel_shows_pips_error_then_tries_the_url(tmp_path, capsys):
    root = tmp_path / "input" / "wheels"
    root.mkdir(parents=True)
    with zipfile.ZipFile(root / "cxr-9.9.9-py3-none-any.whl", "w") as broken:  # no metadata: not a wheel
        broken.writestr("nothing.txt", "")
    url = (tmp_path / "no-such-repository").as_uri()
    with pytest.raises(kaggle_bootstrap.BootstrapError, match="tried .*cxr-9.9.9.*, git\\+file:") as error:
        kaggle_bootstrap.install_cxr(tmp_path / "input", repository_url=url, pip=target_install(tmp_path / "site"))
    assert "uv build --wheel" in str(error.value)
    printed = capsys.readouterr()
    assert printed.err.count("pip could not install") == 2
    assert f"Installing cxr from {root / 'cxr-9.9.9-py3-none-any.whl'}" in printed.out
    assert f"Installing cxr from git+{url}" in printed.out


def test_no_wheel_and_no_url_says_how_to_attach_the_wheel(tmp_path):
    (tmp_path / "input" / "some-dataset").mkdir(parents=True)
    with pytest.raises(kaggle_bootstrap.BootstrapError) as error:
        kaggle_bootstrap.install_cxr(tmp_path / "input", repository_url=None, pip=("false",))
    message = str(error.value)
    assert "no cxr-*.whl under" in message and "no repository URL" in message
    assert "uv build --wheel" in message and "Add Input" in message


def test_each_notebooks_first_code_cell_is_the_bootstrap():
    expected = notebook.bootstrap_cell_source()
    for path in NOTEBOOKS:
        first = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert first.source == expected, (f"{path.name}: run `uv run python -c \"import glob; from cxr import notebook; "
                                          "notebook.write_bootstrap_cells(sorted(glob.glob('*.ipynb')))\"`")


def test_bootstrap_needs_only_the_standard_library():
    tree = ast.parse(notebook.BOOTSTRAP_SOURCE.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and imported <= sys.stdlib_module_names


def test_repository_url_is_the_one_in_pyproject():
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("urls", {})
    assert kaggle_bootstrap.REPOSITORY_URL == urls.get("Repository")


def real_mode(monkeypatch, input_root: Path) -> None:
    monkeypatch.delenv("CXR_SMOKE", raising=False)
    monkeypatch.setenv("CXR_KAGGLE_INPUT", str(input_root))


def test_settings_find_a_renamed_dataset_by_its_layout(input_root, monkeypatch):
    real_mode(monkeypatch, input_root)
    settings = notebook.settings("resnet50_full")
    assert settings.data_dir == input_root / "forked-xrays-v2" / "Data"
    assert settings.out == Path("assets")  # relative: the working folder, as on Kaggle


def test_two_copies_of_the_dataset_are_named(input_root, monkeypatch):
    write_synthetic_dataset(input_root / "second-copy", COUNTS, size=16, bad_files=False)
    real_mode(monkeypatch, input_root)
    with pytest.raises(DatasetError, match="2 copies of the dataset") as error:
        notebook.settings("resnet50_full")
    assert "forked-xrays-v2" in str(error.value) and "second-copy" in str(error.value)


def test_no_dataset_says_what_the_input_root_holds(tmp_path, built_wheel, monkeypatch):
    (tmp_path / "input" / "my-cxr-wheel").mkdir(parents=True)
    (tmp_path / "input" / "notes.txt").write_text("")
    real_mode(monkeypatch, tmp_path / "input")
    with pytest.raises(DatasetError, match=r"No dataset under .*it holds my-cxr-wheel/, notes.txt.*Add Input"):
        notebook.settings("resnet50_full")


def test_a_missing_input_root_from_the_environment_is_refused(tmp_path, monkeypatch):
    real_mode(monkeypatch, tmp_path / "missing")
    with pytest.raises(DatasetError, match="CXR_KAGGLE_INPUT=.* is not a folder"):
        notebook.settings("resnet50_full")


def test_explicit_data_folder_wins_over_the_input_root(input_root, tmp_path, monkeypatch):
    real_mode(monkeypatch, input_root)
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "mine"))
    assert notebook.settings("resnet50_full").data_dir == tmp_path / "mine"
