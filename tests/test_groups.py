"""The groups CSV: found by relative path or unique file name, refused in one line when it cannot serve."""

from pathlib import Path

import pytest

from cxr.data.groups import GroupsError, read_groups


def _images(root: Path, names: list[str]) -> list[Path]:
    paths = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        paths.append(path)
    return paths


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_groups_are_read_by_relative_path_and_by_unique_file_name(tmp_path):
    paths = _images(tmp_path, ["test/NORMAL/a.jpg", "test/PNEUMONIA/b.jpg", "test/NORMAL/c.jpg"])
    table = _csv(tmp_path / "m.csv", "file,source_repo\ntest/NORMAL/a.jpg,kermany\nb.jpg,kermany\n"
                                     "train/NORMAL/c.jpg,nih\n")
    assert read_groups(table, "source_repo", paths, tmp_path) == ["kermany", "kermany", "nih"]


def test_a_file_name_listed_twice_must_be_named_by_its_path(tmp_path):
    paths = _images(tmp_path, ["test/NORMAL/a.jpg", "test/PNEUMONIA/b.jpg"])
    table = _csv(tmp_path / "m.csv", "file,g\ntrain/NORMAL/a.jpg,x\nval/NORMAL/a.jpg,y\ntest/PNEUMONIA/b.jpg,z\n")
    with pytest.raises(GroupsError, match=r"no 'g' for 1 of 2 images: 'test/NORMAL/a.jpg'"):
        read_groups(table, "g", paths, tmp_path)


@pytest.mark.parametrize("text, message", [
    ("file,group\na.jpg,1\n", r"no column 'source_repo'; its columns: file, group"),
    ("name,source_repo\na.jpg,1\n", r"no column naming the images"),
    ("file,source_repo\na.jpg,1\n", r"no 'source_repo' for 1 of 2 images: 'b.jpg'"),
    ("file,source_repo\na.jpg,1\nb.jpg,\n", r"no 'source_repo' for 1 of 2 images"),
    ("file,source_repo\na.jpg,1\nb.jpg,1\n", r"puts all 2 images in 1 group \('1'\); at least 2 are needed"),
])
def test_a_csv_that_cannot_serve_is_refused_naming_what_is_wrong(tmp_path, text, message):
    paths = _images(tmp_path, ["a.jpg", "b.jpg"])
    with pytest.raises(GroupsError, match=message):
        read_groups(_csv(tmp_path / "m.csv", text), "source_repo", paths, tmp_path)


def test_a_missing_or_binary_csv_is_refused(tmp_path):
    paths = _images(tmp_path, ["a.jpg"])
    with pytest.raises(GroupsError, match="does not exist"):
        read_groups(tmp_path / "none.csv", "g", paths, tmp_path)
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(GroupsError, match="not a readable UTF-8 CSV"):
        read_groups(tmp_path / "bin.csv", "g", paths, tmp_path)


def test_one_group_is_allowed_when_asked(tmp_path):
    paths = _images(tmp_path, ["a.jpg"])
    assert read_groups(_csv(tmp_path / "m.csv", "file,g\na.jpg,p1\n"), "g", paths, tmp_path, min_groups=1) == ["p1"]
