"""Images added to training from other folders (cxr train --add-train), on synthetic folders: bad input refused in
one line before anything is written, the group-wise holdout, the duplicate audit, and what the run records."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from cxr.data.added_folders import AddedFolders, added_sentence, check_added, folders_from_env, holdout_mask
from cxr.cli import main
from cxr.data.dataset import load_splits
from cxr.data.layout import CLASSES, class_of
from cxr.common.inputs import InputError
from cxr.data.synthetic import write_synthetic_dataset


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

    listed = f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}{os.pathsep}"
    assert folders_from_env(listed) == [tmp_path / "a", tmp_path / "b"]
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
    from cxr.train.added_training import add_to_training

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
    from cxr.train.added_training import add_to_training

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


LESIONS = {"COVID19": [(0.7, 0.3), (0.7, 0.7)], "NORMAL": [], "PNEUMONIA": [(0.7, 0.3)],
           "TUBERCULOSIS": [(0.3, 0.3), (0.3, 0.7)]}
ADULTS = ("COVID19", "TUBERCULOSIS")


def cue_image(name: str, bright_border: bool, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """The class as bright 'lesions' (none for NORMAL) over smooth structure of each image's own; the source
    as a bright frame, the planted cue: in the main set only the adults' classes have it."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    lesions = sum((np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.02) for cy, cx in LESIONS[name]), np.zeros_like(x))
    structure = gaussian_filter(rng.normal(0, 1, (size, size)), size / 8, mode="wrap")
    frame = np.minimum.reduce([x, y, 1 - x, 1 - y]) < 0.12
    pixels = 0.3 + 0.5 * lesions + 0.12 * structure / structure.std() + 0.4 * bright_border * frame
    return (np.clip(pixels + rng.normal(0, 0.03, (size, size)), 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def cue_sets(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A main set whose frame names the source (adults: COVID19, TUBERCULOSIS), and two added sources of
    healthy and pneumonia adults: one framed like the main set's adults (the cue now misleads), one not."""
    root, rng = tmp_path_factory.mktemp("cue"), np.random.default_rng(0)
    for split, per_class in {"train": 20, "val": 4, "test": 8}.items():
        for name in CLASSES:
            (root / "main" / split / name).mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(cue_image(name, name in ADULTS, rng)).save(root / "main" / split / name / f"{k}.png")
    for source, framed in (("framed", True), ("plain", False)):
        rows = [("file", "group")]
        for name in ("NORMAL", "PNEUMONIA"):
            (root / source / name).mkdir(parents=True)
            for k in range(24):
                Image.fromarray(cue_image(name, framed, rng)).save(root / source / name / f"{k}.png")
                rows.append((f"{name}/{k}.png", f"patient{k // 2}"))
        with (root / source / "manifest.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    return root / "main", root / "framed", root / "plain"


def linear_model(train) -> object:
    """A small model trained on a split: logistic regression on 16 px thumbnails."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=3000).fit(thumbnails(train.paths), train.labels)


def thumbnails(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("L").resize((16, 16)), np.float32).ravel() / 255 for p in paths])


def sent_to_adult_classes(model, held) -> float:
    """The share of the held-out healthy images the model calls COVID19 or TUBERCULOSIS."""
    normal = [p for p, y in zip(held.paths, held.labels) if CLASSES[y] == "NORMAL"]
    predicted = model.predict(thumbnails(normal))
    return float(np.isin(predicted, [CLASSES.index(c) for c in ADULTS]).mean())


@pytest.mark.parametrize("source", ["framed", "plain"])
def test_adding_a_source_that_breaks_the_planted_cue_changes_what_the_model_does_with_it(cue_sets, source):
    """Trained on the main set, a model reads the frame: the held-out healthy adults of a framed source are
    called COVID19 or TUBERCULOSIS. With that source's other patients added to training, the frame no longer
    names the class and they are called NORMAL. A source without the frame is read right either way."""
    from cxr.train.added_training import add_to_training

    main_set, added = cue_sets[0], cue_sets[1 if source == "framed" else 2]
    splits = load_splits(main_set)
    options = dict(holdout=0.5, groups=(added / "manifest.csv",))
    control = add_to_training(splits, AddedFolders((added,), holdout_only=True, **options), progress=False)
    extended = add_to_training(splits, AddedFolders((added,), **options), progress=False)
    held = control.holdouts[0][2]
    assert held.paths == extended.holdouts[0][2].paths and len(held) == 24  # 6 of 12 patients, 4 films each
    before, after = (linear_model(run.splits.train) for run in (control, extended))
    for model in (before, after):  # the main test split is read right with or without the added images
        assert (model.predict(thumbnails(splits.test.paths)) == splits.test.labels).mean() >= 0.85
    held_accuracy = [(model.predict(thumbnails(held.paths)) == held.labels).mean() for model in (before, after)]
    if source == "framed":  # measured: all 12 healthy adults called COVID19 or TUBERCULOSIS, then 3
        assert sent_to_adult_classes(before, held) >= 0.9 and sent_to_adult_classes(after, held) <= 0.4
        assert held_accuracy[0] <= 0.2 and held_accuracy[1] >= 0.6
    else:  # measured: none, and none
        assert sent_to_adult_classes(before, held) <= 0.1 and sent_to_adult_classes(after, held) <= 0.1
        assert min(held_accuracy) >= 0.8


@pytest.fixture(scope="module")
def added_run(cue_sets, tmp_path_factory) -> tuple[Path, dict, str, list]:
    """One tiny ``cxr train`` (frozen random MobileNetV2, the lightest backbone, head on cached features, one epoch) with the framed
    source added, half of its patients held out, and the plain source as an --external folder."""
    import contextlib
    import io
    import json

    from cxr.train import engine

    main_set, framed, plain = cue_sets
    out, weighted, stdout = tmp_path_factory.mktemp("added-run"), [], io.StringIO()
    real = engine.class_weights

    def recording(labels, *args, **kwargs):
        weighted.append(list(labels))
        return real(labels, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setenv("CXR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cxr-cache"))
        patch.setattr(engine, "class_weights", recording)
        code = main(["train", "mobilenet_v2_head", f"--data-dir={main_set}", f"--out={out}", "--weights=none",
                     "--no-augment", "--epochs=1", "--image-size=32", "--batch-size=8", "--device=cpu", "--quiet",
                     "--no-tensorboard", "--add-train", str(framed), "--add-train-holdout=0.5",
                     "--groups", str(framed / "manifest.csv"), "--external", str(plain)])
    assert code == 0, stdout.getvalue()
    run_dir = out / "mobilenet_v2_head"
    return run_dir, json.loads((run_dir / "metrics.json").read_text()), stdout.getvalue(), weighted


def test_a_run_trains_on_the_added_images_and_scores_the_held_out_part(added_run, cue_sets):
    import json

    run_dir, metrics, stdout, weighted = added_run
    record = metrics["added_training"]
    folder = record["folders"][0]
    assert folder["folder"] == "framed" and folder["added"]["NORMAL"] + folder["added"]["PNEUMONIA"] == 24
    assert record["external_folders"] == ["framed-holdout", "plain"]
    counts = metrics["dataset"]["counts"]
    assert counts["train"]["NORMAL"] == 18 + folder["added"]["NORMAL"] and counts["train"]["COVID19"] == 18
    assert counts["val"] == {c: 2 for c in CLASSES} and counts["test"] == {c: 8 for c in CLASSES}
    final = [CLASSES.index(c) for c in CLASSES for _ in range(counts["train"][c])]
    assert weighted and all(sorted(labels) == final for labels in weighted)  # the weights of the final split
    held = json.loads((run_dir / "external" / "framed-holdout" / "metrics.json").read_text())
    assert held["test"]["images"] == 24 and held["overlaps"]["count"] == 0
    assert (run_dir / "external" / "plain" / "metrics.json").is_file()
    assert "framed-holdout" in stdout and "24 images from other folders added to the training split" in stdout
    assert added_sentence(record) in (run_dir / "model_card.md").read_text()


def test_readme_report_names_the_added_folders(added_run):
    from cxr.report.readme import collect_metrics, render_results

    run_dir, metrics, _, _ = added_run
    block = render_results(collect_metrics(run_dir.parent), run_dir.parent)
    assert "| `mobilenet_v2_head + framed` |" in block
    assert "`mobilenet_v2_head + framed` **external** `framed-holdout`" in block
    assert added_sentence(metrics["added_training"]) in block


def test_notebooks_read_cxr_add_train(monkeypatch, tmp_path):
    import os

    from cxr import notebook

    first, second = added_folder(tmp_path / "a"), added_folder(tmp_path / "b", seed=9)
    monkeypatch.delenv("CXR_SMOKE", raising=False)
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_ADD_TRAIN", f"{first}{os.pathsep}{second}")
    settings = notebook.settings("resnet50_full")
    assert settings.run_options["options"].add_train == AddedFolders((first, second))
    assert settings.summary().loc["added to training", "value"] == f"{first}, {second}"
    monkeypatch.setenv("CXR_ADD_TRAIN", str(tmp_path / "missing"))
    with pytest.raises(InputError, match="does not exist"):
        notebook.settings("resnet50_full")
    monkeypatch.delenv("CXR_ADD_TRAIN")
    assert notebook.settings("resnet50_full").run_options["options"].add_train is None


def test_cli_refuses_a_copy_of_a_test_image_by_name_before_training(dataset, tmp_path, capsys):
    added = added_folder(tmp_path / "adults")
    test_image = sorted((dataset / "test" / "PNEUMONIA").iterdir())[1]
    planted = copy_of(test_image, added / "Pneumonia" / "planted.png", brighter=True)
    out = tmp_path / "out"
    message = refused(["train", "resnet50_full", f"--data-dir={dataset}", f"--out={out}", "--weights=none",
                       "--quiet", "--add-train", str(added)], capsys)
    assert str(planted) in message and f"test/PNEUMONIA/{test_image.name}" in message
    assert not out.exists()
