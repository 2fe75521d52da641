"""External validation (cxr evaluate --external) on synthetic folders: layouts, spellings, bad input, overlaps."""

import json
import shutil
from pathlib import Path

import pytest

from cxr.cli import main
from cxr.data.dataset import ExternalDataError, scan_external
from cxr.external import evaluate_external
from cxr.data.layout import CLASSES, class_of
from cxr.common.runtime import Runtime
from cxr.data.synthetic import write_synthetic_dataset

CPU = Runtime.create("cpu", progress=False)
SPELLED = {"COVID19": "Covid-19", "NORMAL": "normal", "PNEUMONIA": "Pneumonia", "TUBERCULOSIS": "TB"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A clean synthetic dataset (no bad files) that the module's checkpoint is said to be trained on."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("trained-on") / "data", bad_files=False)


def external_folder(dataset: Path, root: Path, classes=CLASSES, planted: int = 0, layout: str = "test") -> Path:
    """The dataset's test images under other spellings of the class names, plus ``planted`` training
    images of each class copied in."""
    base = root / "test" if layout == "test" else root
    for name in classes:
        folder = base / SPELLED[name]
        folder.mkdir(parents=True)
        source = "TURBERCULOSIS" if name == "TUBERCULOSIS" else name
        for path in sorted((dataset / "test" / source).iterdir()):
            shutil.copy(path, folder / path.name)
        for path in sorted((dataset / "train" / source).iterdir())[:planted]:
            shutil.copy(path, folder / f"planted_{path.name}")
    return root


def test_folder_names_are_matched_with_common_spellings():
    for name, label in [("Tuberculosis", "TUBERCULOSIS"), ("TB", "TUBERCULOSIS"), ("tb", "TUBERCULOSIS"),
                        ("TURBERCULOSIS", "TUBERCULOSIS"), ("COVID-19", "COVID19"), ("covid_19", "COVID19"),
                        ("Normal", "NORMAL"), ("Pneumonia", "PNEUMONIA")]:
        assert class_of(name) == label, name
    assert class_of("Viral Pneumonia") is None and class_of("cats") is None


@pytest.mark.parametrize("layout", ["test", "flat"])
def test_both_layouts_are_scanned(dataset, tmp_path, layout):
    root = external_folder(dataset, tmp_path / "ext", layout=layout)
    split, ignored, base = scan_external(root)
    assert base == (root / "test" if layout == "test" else root) and ignored == []
    expected = {c: len(list((dataset / "test" / ("TURBERCULOSIS" if c == "TUBERCULOSIS" else c)).iterdir()))
                for c in CLASSES}
    assert split.counts() == expected


def test_extra_folders_are_listed_as_ignored(dataset, tmp_path):
    root = external_folder(dataset, tmp_path / "ext", layout="flat")
    (root / "Lung Opacity").mkdir()
    shutil.copy(next((root / "normal").iterdir()), root / "Lung Opacity" / "x.png")
    split, ignored, _ = scan_external(root)
    assert ignored == ["Lung Opacity"] and "x.png" not in {p.name for p in split.paths}


@pytest.mark.parametrize("make", ["unknown", "empty", "empty_classes", "missing"])
def test_unusable_folders_give_clear_errors(tmp_path, make):
    root = tmp_path / "ext"
    if make != "missing":
        root.mkdir()
    if make == "unknown":
        (root / "cats").mkdir()
        (root / "dogs").mkdir()
    if make == "empty_classes":
        (root / "Normal").mkdir()
        (root / "TB").mkdir()
        (root / "TB" / "notes.txt").write_text("not an image")
    with pytest.raises(ExternalDataError) as error:
        scan_external(root)
    message = str(error.value)
    if make == "missing":
        assert "does not exist" in message
    else:
        assert "COVID19" in message and "TUBERCULOSIS" in message and "TB" in message
    if make == "unknown":
        assert "cats, dogs" in message


def test_external_scores_with_and_without_training_overlaps(dataset, checkpoint, tmp_path):
    root = external_folder(dataset, tmp_path / "elsewhere", planted=2)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=f"{2 * len(CLASSES)} of .* external images also appear"):
        result = evaluate_external(checkpoint, root, data_dir=dataset, out=out, runtime=CPU)
    planted = {p for p in result["overlaps"]["files"] if Path(p).name.startswith("planted_")}
    assert len(planted) == 2 * len(CLASSES) == result["overlaps"]["count"]  # the planted files, and no others
    for path in planted:
        assert any(": train/" in match for match in result["overlaps"]["files"][path])
    assert result["test_without_overlaps"]["images"] == result["test"]["images"] - result["overlaps"]["count"]
    assert result["test"]["roc_auc_ovr"] is not None and "ci95" in result["test"]
    assert set(result["test"]["operating_points"]) == set(CLASSES)
    folder = out / "resnet50_full" / "external" / "elsewhere"
    written = json.loads((folder / "metrics.json").read_text())
    assert written["test"]["accuracy"] == pytest.approx(result["test"]["accuracy"])
    assert (folder / "roc.png").is_file() and (folder / "confusion_matrix.png").is_file()
    assert not (out / "resnet50_full" / "metrics.json").exists()  # the internal results are left alone


def test_one_class_only_is_scored_with_auroc_undefined(dataset, checkpoint, tmp_path, capsys):
    root = external_folder(dataset, tmp_path / "tb_only", classes=["TUBERCULOSIS"], layout="flat")
    code = main(["evaluate", "resnet50_full", f"--checkpoint={checkpoint}", f"--external={root}",
                 f"--data-dir={dataset}", f"--out={tmp_path / 'out'}", "--device=cpu", "--quiet"])
    assert code == 0
    output = capsys.readouterr().out
    assert "macro AUROC undefined" in output and "test accuracy" in output
    written = json.loads((tmp_path / "out" / "resnet50_full" / "external" / "tb_only" / "metrics.json").read_text())
    assert written["test"]["roc_auc_ovr"] is None
    assert written["external"]["absent_classes"] == ["COVID19", "NORMAL", "PNEUMONIA"]
    assert all(entry["auroc"] is None for entry in written["test"]["pairwise_auroc"].values())
    assert "Pairwise AUROC is undefined: the images hold one class only." in output
    shares = written["test"]["class_shares"]
    assert list(shares["shares"]) == ["TUBERCULOSIS"] and shares["absent"] == ["COVID19", "NORMAL", "PNEUMONIA"]
    assert sum(shares["shares"]["TUBERCULOSIS"]["predicted"].values()) == pytest.approx(1)
    assert shares["sentence"] in output and "were called a class this folder does not hold" in shares["sentence"]
    baseline = written["shortcut_baseline"]
    assert baseline["test_images"] == written["test"]["images"] and "macro_f1" in baseline["test"]
    assert written["shortcuts"]["probes"]["train_images"] > 0 and "sentence" in written["shortcuts"]


def test_a_folder_of_training_images_is_scored_and_said_loudly(dataset, checkpoint, tmp_path, capsys):
    root = tmp_path / "copies"
    for name in CLASSES:
        source = "TURBERCULOSIS" if name == "TUBERCULOSIS" else name
        shutil.copytree(dataset / "train" / source, root / SPELLED[name])
    with pytest.warns(UserWarning, match="EVERY external image"):
        code = main(["evaluate", "resnet50_full", f"--checkpoint={checkpoint}", f"--external={root}",
                     f"--data-dir={dataset}", f"--out={tmp_path / 'out'}", "--device=cpu", "--quiet"])
    assert code == 0
    output = capsys.readouterr().out
    assert "WARNING: EVERY external image" in output and "overlaps training:" in output
    written = json.loads((tmp_path / "out" / "resnet50_full" / "external" / "copies" / "metrics.json").read_text())
    assert written["test_without_overlaps"] is None and written["test"]["accuracy"] is not None


def test_cli_bad_external_folder_is_one_error_line(checkpoint, tmp_path, capsys):
    (tmp_path / "ext" / "cats").mkdir(parents=True)
    code = main(["evaluate", "resnet50_full", f"--checkpoint={checkpoint}", f"--external={tmp_path / 'ext'}",
                 "--device=cpu", "--quiet"])
    assert code == 1
    assert capsys.readouterr().err.startswith("error: no class folder in")


def test_tta_is_refused_with_external_rather_than_ignored(checkpoint, tmp_path, capsys):
    assert main(["evaluate", "resnet50_full", f"--checkpoint={checkpoint}", f"--external={tmp_path}", "--tta"]) == 1
    assert capsys.readouterr().err.startswith("error: --tta is not available with --external")


def _manifest(root: Path, column: str, value) -> Path:
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    csv = root.parent / f"{root.name}-manifest.csv"
    csv.write_text(f"file,{column}\n" + "".join(f"{f},{value(i)}\n" for i, f in enumerate(files)))
    return csv


def test_without_data_dir_the_folder_is_scored_and_marked_not_audited(dataset, checkpoint, tmp_path, capsys):
    root = external_folder(dataset, tmp_path / "nih", classes=["NORMAL", "PNEUMONIA"], layout="flat")
    for path in root.rglob("*.jpg"):
        path.unlink()  # PNG only, so the manifest lists every image
    csv = _manifest(root, "group", lambda i: "first" if i % 2 else "second")
    with pytest.warns(UserWarning, match="does not record its training data folder: --data-dir is needed"):
        code = main(["evaluate", f"--checkpoint={checkpoint}", f"--external={root}", f"--out={tmp_path / 'out'}",
                     "--device=cpu", "--quiet", f"--groups={csv}"])
    assert code == 0
    output = capsys.readouterr().out
    assert "overlap not audited: the checkpoint does not record its training data folder" in output
    written = json.loads((tmp_path / "out" / "resnet50_full" / "external" / "nih" / "metrics.json").read_text())
    assert written["overlaps"]["audited"] is False and written["trained_on"] is None
    assert written["test"]["operating_points"] is None and written["shortcuts"]["probes"] is None
    assert written["test"]["pairwise_auroc"]["NORMAL vs PNEUMONIA"]["auroc"] is not None
    assert "NORMAL vs PNEUMONIA, the pair that shares a source" in output
    assert set(written["test"]["groups"]["too_small"]) == {"first", "second"}  # 4 PNG images in each


def test_the_training_folder_the_checkpoint_recorded_is_used(dataset, checkpoint, tmp_path):
    import torch

    state = torch.load(checkpoint, weights_only=False)
    state["data"] = {"val_source": "carve", "root": str(dataset)}
    recorded = tmp_path / "recorded.pt"
    torch.save(state, recorded)
    root = external_folder(dataset, tmp_path / "ext", classes=["NORMAL"], planted=1, layout="flat")
    with pytest.warns(UserWarning, match="1 of .* external images also appear"):
        result = evaluate_external(recorded, root, out=tmp_path / "out", runtime=CPU)
    assert result["overlaps"]["audited"] and result["overlaps"]["count"] == 1
    assert result["trained_on"]["root"] == str(dataset)


@pytest.mark.parametrize("problem", ["column", "unknown", "one_group"])
def test_bad_groups_csv_is_one_error_line(dataset, checkpoint, tmp_path, capsys, problem):
    root = external_folder(dataset, tmp_path / "ext", classes=["NORMAL", "TUBERCULOSIS"], layout="flat")
    csv = _manifest(root, "source_repo", lambda i: "one" if problem == "one_group" else f"g{i % 2}")
    if problem == "unknown":  # an image the CSV does not list
        shutil.copy(next((root / "normal").glob("*.png")), root / "normal" / "extra.png")
    column = "hospital" if problem == "column" else "source_repo"
    code = main(["evaluate", f"--checkpoint={checkpoint}", f"--external={root}", f"--out={tmp_path / 'out'}",
                 "--device=cpu", "--quiet", f"--groups={csv}", f"--group-column={column}"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: groups CSV") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    expected = {"column": "has no column 'hospital'; its columns: file, source_repo",
                "unknown": "gives no 'source_repo' for 1 of 9 images: 'normal/extra.png'", "one_group": "in 1 group ('one')"}[problem]
    assert expected in err
