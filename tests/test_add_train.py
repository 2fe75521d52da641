"""Images added to training from other folders (cxr train --add-train), on synthetic folders: bad input refused in
one line before anything is written, the group-wise holdout, the duplicate audit, and what the run records."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.added_folders import AddedFolders, added_sentence, check_added, folders_from_env, holdout_mask
from cxr.cli import main
from cxr.data import CLASSES, load_splits
from cxr.layout import class_of
from cxr.preflight import InputError
from cxr.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("main") / "data", bad_files=False)


def added_folder(root: Path, names=("normal", "Pneumonia"), per_class: int = 4, seed: int = 7) -> Path:
    """Class folders from another 'source' (other pictures than the dataset's), with a manifest.csv whose
    ``group`` column gives patient k the images 2k and 2k + 1 of every class folder (films of one patient)."""
    source = write_synthetic_dataset(root.parent / f"{root.name}-source", {"train": per_class}, bad_files=False,
                                     seed=seed)
    rows = []
    for name in names:
        label = class_of(name)
        shutil.copytree(source / "train" / ("TURBERCULOSIS" if label == "TUBERCULOSIS" else label), root / name)
        rows += [(f"{name}/{p.name}", f"patient{k // 2}")
                 for k, p in enumerate(sorted((root / name).iterdir()))]
    with (root / "manifest.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("file", "group"), *rows])
    return root


def refused(argv: list[str], capsys) -> str:
    """Run ``cxr`` and return its one error line; the run must write nothing."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("case", ["unknown_class", "same_as_external", "inside_external", "empty", "missing",
                                  "holdout_zero", "holdout_one", "holdout_above", "no_training_group",
                                  "groups_without_holdout", "groups_missing_images", "holdout_without_folder"])
def test_bad_input_is_one_line_before_anything_is_written(case, dataset, tmp_path, capsys):
    added = added_folder(tmp_path / "adults")
    out = tmp_path / "out"
    argv = ["train", "resnet50_full", f"--data-dir={dataset}", f"--out={out}", "--weights=none", "--quiet",
            "--add-train", str(added)]
    expected = {
        "unknown_class": ("Lung Opacity", "COVID19"), "same_as_external": ("both as --add-train and as --external",),
        "inside_external": ("both as --add-train and as --external",), "empty": ("is empty",),
        "missing": ("does not exist",), "holdout_zero": ("outside (0, 1)",), "holdout_one": ("outside (0, 1)",),
        "holdout_above": ("outside (0, 1)",), "no_training_group": ("leaves none for training",),
        "groups_without_holdout": ("--add-train-holdout",), "groups_missing_images": ("gives no 'group'", "train_001"),
        "holdout_without_folder": ("need --add-train",),
    }[case]
    if case == "unknown_class":
        (added / "Lung Opacity").mkdir()
        shutil.copy(next((added / "normal").iterdir()), added / "Lung Opacity" / "x.png")
    elif case == "same_as_external":
        argv += ["--external", str(added)]
    elif case == "inside_external":
        argv += ["--external", str(tmp_path)]  # the added folder sits inside the external one
    elif case == "empty":
        for image in added.rglob("*.*g"):
            image.unlink()
    elif case == "missing":
        argv[-1] = str(tmp_path / "nowhere")
    elif case.startswith("holdout_") and case != "holdout_without_folder":
        argv += ["--add-train-holdout", {"holdout_zero": "0", "holdout_one": "1", "holdout_above": "1.5"}[case]]
    elif case == "no_training_group":  # four patients: 0.9 of them is all four
        argv += ["--add-train-holdout", "0.9", "--groups", str(added / "manifest.csv")]
    elif case == "groups_without_holdout":
        argv += ["--groups", str(added / "manifest.csv")]
    elif case == "groups_missing_images":
        rows = (added / "manifest.csv").read_text().splitlines()
        (added / "manifest.csv").write_text("\n".join(r for r in rows if "train_001" not in r) + "\n")
        argv += ["--add-train-holdout", "0.5", "--groups", str(added / "manifest.csv")]
    elif case == "holdout_without_folder":
        argv = argv[:-2] + ["--add-train-holdout", "0.5"]
    message = refused(argv, capsys)
    assert all(text in message for text in expected), message
    assert not out.exists()


def test_holdout_is_seeded_group_wise_and_of_the_asked_size():
    groups = [f"patient{k // 3}" for k in range(60)]  # 20 patients, three images each
    mask = holdout_mask(groups, 0.25, 42, Path("x"))
    held = {g for g, h in zip(groups, mask) if h}
    assert len(held) == 5 and mask.sum() == 15
    assert not held & {g for g, h in zip(groups, mask) if not h}  # no patient on both sides
    assert np.array_equal(mask, holdout_mask(groups, 0.25, 42, Path("x")))
    assert not np.array_equal(mask, holdout_mask(groups, 0.25, 43, Path("x")))
    with pytest.raises(InputError, match="leaves none for training"):
        holdout_mask(["a", "b"], 0.6, 42, Path("x"))


def test_without_a_csv_each_image_is_its_own_group(tmp_path):
    added = added_folder(tmp_path / "adults")
    check_added(AddedFolders((added,), holdout=0.5))  # eight images, eight groups: fine
    single = added_folder(tmp_path / "one", names=("normal",), per_class=1)
    with pytest.raises(InputError, match="of the 1 group"):
        check_added(AddedFolders((single,), holdout=0.5))


def test_env_lists_folders_by_path_separator(tmp_path):
    import os

    assert folders_from_env(f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}{os.pathsep}") == [tmp_path / "a", tmp_path / "b"]
    assert folders_from_env(None) == [] and AddedFolders.of([]) is None


def copy_of(source: Path, target: Path, brighter: bool = False) -> Path:
    """``source`` as another file: a byte copy, or re-encoded brighter (a near duplicate)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not brighter:
        return Path(shutil.copy(source, target))
    pixels = np.asarray(Image.open(source).convert("L"), dtype=np.float32)
    Image.fromarray(np.clip(pixels * 1.1 + 10, 0, 255).astype(np.uint8)).save(target.with_suffix(".jpg"), quality=92)
    return target.with_suffix(".jpg")


def test_duplicates_of_test_and_external_images_are_refused_by_name_or_dropped(dataset, tmp_path):
    from cxr.added_training import add_to_training

    added = added_folder(tmp_path / "adults")
    external = added_folder(tmp_path / "elsewhere", names=("TB",), per_class=3, seed=11)
    test_image = sorted((dataset / "test" / "NORMAL").iterdir())[0]
    planted = [copy_of(test_image, added / "normal" / "copy_of_test.png"),
               copy_of(sorted((external / "TB").iterdir())[1], added / "normal" / "near_external.png", brighter=True)]
    splits = load_splits(dataset)
    options = AddedFolders((added,))
    with pytest.raises(InputError) as error:
        add_to_training(splits, options, [external], progress=False)
    message = str(error.value)
    assert message.startswith("2 added training image(s)") and "--add-train-drop-duplicates" in message
    assert all(str(path) in message for path in planted) and "test: test/NORMAL/" + test_image.name in message
    with pytest.warns(UserWarning, match="Left out of training 2 added image"):
        result = add_to_training(splits, AddedFolders((added,), drop_duplicates=True), [external], progress=False)
    assert not set(planted) & set(result.splits.train.paths)
    record = result.splits.added
    assert sorted(d["file"] for d in record["folders"][0]["dropped_duplicates"]) == sorted(map(str, planted))
    assert record["images"] == 8 and record["external_folders"] == ["elsewhere"]


def test_added_images_join_train_only_with_their_holdout_apart(dataset, tmp_path):
    from cxr.added_training import add_to_training

    added = added_folder(tmp_path / "adults", per_class=6)
    splits = load_splits(dataset)
    options = AddedFolders((added,), holdout=0.5, groups=(added / "manifest.csv",))
    result = add_to_training(splits, options, progress=False)
    train, (name, folder, held) = result.splits.train, result.holdouts[0]
    new = [p for p in train.paths if added in p.parents]
    assert name == "adults-holdout" and folder == added
    assert len(new) + len(held) == 12 and len(held) == 8  # two of three patients, four images each
    assert not set(held.paths) & set(train.paths)
    assert result.splits.val.paths == splits.val.paths and result.splits.test.paths == splits.test.paths
    assert train.paths[:len(splits.train)] == splits.train.paths
    record = result.splits.added["folders"][0]
    assert record["groups"] == {"csv": str(added / "manifest.csv"), "column": "group", "training": 1, "held_out": 2}
    assert sum(record["added"].values()) == len(new) and sum(record["held_out"].values()) == 8
    assert set(record["added"]) == set(CLASSES) and record["added"]["COVID19"] == 0
    again = add_to_training(splits, options, progress=False)
    assert again.holdouts[0][2].paths == held.paths  # deterministic
    control = add_to_training(splits, AddedFolders((added,), 0.5, (added / "manifest.csv",), holdout_only=True),
                              progress=False)
    assert control.splits.train.paths == splits.train.paths and control.holdouts[0][2].paths == held.paths
    sentence = added_sentence(result.splits.added)
    assert sentence.startswith(f"{len(new)} images from other folders added") and "`adults-holdout`" in sentence
    assert added_sentence(control.splits.added).startswith("Control run, nothing added")
