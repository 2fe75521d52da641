"""Locating the dataset: --data-dir, CXR_DATA_DIR, a kagglehub download, and the offline error."""

from __future__ import annotations

from pathlib import Path

import kagglehub
import pytest

from cxr.cli import main
from cxr.data.layout import KAGGLE_HANDLE, DatasetError, find_split_root, locate_dataset
from cxr.data.synthetic import write_synthetic_dataset


def make_dataset(folder: Path) -> Path:
    """A small clean dataset; returns the split root."""
    return write_synthetic_dataset(folder, counts={"train": 2, "val": 1, "test": 1}, size=8, bad_files=False)


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """Record kagglehub downloads instead of reaching the network; each returns nothing usable."""
    calls: list[str] = []

    def fake_download(handle: str, *args, **kwargs) -> str:
        calls.append(handle)
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(kagglehub, "dataset_download", fake_download)
    return calls


def test_data_dir_wins_over_environment_and_download(tmp_path, monkeypatch, downloads):
    explicit, from_env = make_dataset(tmp_path / "explicit"), make_dataset(tmp_path / "env")
    monkeypatch.setenv("CXR_DATA_DIR", str(from_env))
    assert locate_dataset(explicit) == explicit
    assert locate_dataset(str(explicit)) == explicit
    assert locate_dataset() == from_env
    assert downloads == []


def test_missing_data_dir_is_an_error_not_a_download(tmp_path, downloads):
    with pytest.raises(DatasetError, match="does not exist"):
        locate_dataset(tmp_path / "nowhere")
    assert downloads == []


@pytest.mark.parametrize("nesting", [(), ("chest_xray",), ("archive", "chest_xray")])
def test_split_folders_found_up_to_two_levels_down(tmp_path, nesting):
    root = make_dataset(tmp_path.joinpath("download", *nesting))
    (tmp_path / "download" / "README.txt").write_text("not a folder")
    assert find_split_root(tmp_path / "download") == root
    assert locate_dataset(tmp_path / "download") == root


def test_folder_without_splits_is_a_clear_error(tmp_path):
    (tmp_path / "photos" / "cats").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"No train/ and test/ folders found.*Expected layout"):
        locate_dataset(tmp_path / "photos")


def test_kagglehub_download_returning_a_nested_folder(tmp_path, monkeypatch):
    cache = tmp_path / "kagglehub" / "datasets" / "jtiptj" / "versions" / "1"
    root = make_dataset(cache / "chest_xray" / "chest_xray")
    calls: list[str] = []

    def fake_download(handle: str, *args, **kwargs) -> str:
        calls.append(handle)
        return str(cache)

    monkeypatch.setattr(kagglehub, "dataset_download", fake_download)
    assert locate_dataset() == root
    assert calls == [KAGGLE_HANDLE]


def test_failed_download_explains_what_to_do(downloads):
    with pytest.raises(DatasetError) as caught:
        locate_dataset()
    message = str(caught.value)
    assert downloads == [KAGGLE_HANDLE]
    assert "\n" not in message.strip()  # one paragraph
    assert KAGGLE_HANDLE in message and "no network in tests" in message
    assert "--data-dir" in message and "CXR_DATA_DIR" in message
    assert "train,val,test" in message and "TURBERCULOSIS" in message


def test_cli_prints_the_download_error_without_traceback(tmp_path, capsys, downloads):
    code = main(["train", "resnet50_full", "--out", str(tmp_path / "out"), "--quiet", "--weights", "none"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.startswith("error: Could not download the Kaggle dataset")
    assert "--data-dir" in captured.err and "Expected layout" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists()  # nothing half-written
