"""Shortcut checks: the baseline that never sees the anatomy, masked evaluation, and where the model looks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.evaluate import lung_evidence
from cxr import notebook
from cxr.evaluate import shortcuts
from cxr.audit.data_audit import audit_dataset, format_audit, write_audit
from cxr.cli import main
from cxr.data.dataset import scan_split
from cxr.data.layout import CLASSES
from cxr.data.lung_field import ELLIPSES, LungMaskError, find_lung_masks, geometric_lung_field, lung_fields
from cxr.models.classifier import build_model, preprocessing
from cxr.data.preprocessing import Preprocessing
from cxr.common.runtime import Runtime
from cxr.audit.source_baseline import FEATURES, baseline_report
from cxr.data.synthetic import write_cue_dataset
from cxr.workflow import evaluate_checkpoint


@pytest.fixture(scope="module")
def cue_sets(tmp_path_factory) -> dict:
    """One synthetic set per cue: none (the class is drawn inside the lungs only), aspect ratio, border brightness."""
    return {cue: write_cue_dataset(tmp_path_factory.mktemp(f"cue-{cue}") / "data", cue) for cue in (None, "aspect", "border")}


def _baseline(root: Path, cache: Path) -> dict:
    return baseline_report(scan_split(root, "train"), scan_split(root, "test"), 64, cache)


@pytest.mark.parametrize("cue", ["aspect", "border"])
def test_baseline_finds_a_planted_cue(cue_sets, cue, tmp_path):
    report = _baseline(cue_sets[cue], tmp_path)
    assert report["features"] == list(FEATURES) and report["train_images"] == 120 and report["test_images"] == 60
    assert report["test"]["macro_f1"] > 0.6  # chance is 0.25
    low, high = report["test"]["ci95"]["macro_f1"]
    assert low <= report["test"]["macro_f1"] <= high and low > 0.4


def test_baseline_is_near_chance_without_a_cue(cue_sets, tmp_path):
    report = _baseline(cue_sets[None], tmp_path)
    assert report["test"]["macro_f1"] < 0.45
    assert _baseline(cue_sets[None], tmp_path)["test"] == report["test"]  # fixed random_state: same result


def test_audit_prints_and_writes_the_baseline(cue_sets, tmp_path):
    report = audit_dataset(cue_sets["aspect"], progress=False, cache_dir=tmp_path / "cache")
    assert report["shortcut_baseline"]["test"]["accuracy"] > 0.9
    assert "Shortcut baseline (file and border statistics only" in format_audit(report)
    written = json.loads(write_audit(report, tmp_path / "out").read_text())
    assert written["shortcut_baseline"]["test"]["macro_f1"] == report["shortcut_baseline"]["test"]["macro_f1"]


def test_geometric_lung_field_is_two_ellipses_clear_of_the_corners():
    field = geometric_lung_field(100)
    assert 0.25 < field.mean() < 0.31 and (field == field[:, ::-1]).all()  # left-right symmetric
    for cx, cy, _, _ in ELLIPSES:
        assert field[int(cy * 100), int(cx * 100)]
    assert not field[50, 50]  # the mediastinum between the lungs
    assert not field[:17, :17].any() and not field[-17:, -17:].any()


def test_masked_views_hide_exactly_the_lung_field():
    prep = preprocessing("resnet50", 32)
    side = Preprocessing.from_dict(prep).square_side
    squares = np.random.default_rng(0).integers(0, 256, (2, side, side), dtype=np.uint8)
    masks = shortcuts.input_masks(np.broadcast_to(geometric_lung_field(side), (2, side, side)), prep)
    plain, hidden, only = (shortcuts.view_inputs(squares, masks, v, prep) for v in shortcuts.VIEWS)
    lung = masks.expand_as(plain)
    assert 0.2 < masks.float().mean() < 0.4
    assert (hidden[lung] == 0).all() and torch.equal(hidden[~lung], plain[~lung])
    assert (only[~lung] == 0).all() and torch.equal(only[lung], plain[lung])


def test_input_masks_follow_the_evaluation_crop():
    prep = {"image_size": 32, "resize": 40}
    square = np.zeros((1, 40, 40), dtype=bool)
    square[:, :, :20] = True  # the left half of the decoded square
    mask = shortcuts.input_masks(square, prep)[0, 0]
    assert mask.shape == (32, 32) and mask[:, :16].all() and not mask[:, 16:].any()


def _write_masks(root: Path, folder: Path, skip: int = 0) -> list[Path]:
    paths = scan_split(root, "test").paths
    for path in paths[skip:]:
        with Image.open(path) as image:
            width, height = image.size
        target = folder / path.parent.name / f"{path.stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[:, : width // 2] = 255
        Image.fromarray(mask).save(target)
    return paths


def test_lung_masks_replace_the_geometric_field(cue_sets, tmp_path):
    paths = _write_masks(cue_sets[None], tmp_path / "masks")
    fields = lung_fields(paths, 40, tmp_path / "masks")
    assert fields.shape == (len(paths), 40, 40)
    assert fields[:, :, :18].all() and not fields[:, :, 22:].any()  # each image's own mask, framed like it


def test_missing_and_misfit_lung_masks_are_named(cue_sets, tmp_path):
    paths = _write_masks(cue_sets[None], tmp_path / "masks", skip=2)
    misfit = tmp_path / "masks" / paths[3].parent.name / f"{paths[3].stem}.png"
    Image.new("L", (5, 7)).save(misfit)
    with pytest.raises(LungMaskError) as error:
        find_lung_masks(paths, tmp_path / "masks")
    message = str(error.value)
    assert "2 image(s) have no mask" in message and paths[0].name in message and paths[1].name in message
    assert "1 mask(s) differ in size" in message and f"{paths[3].stem}.png (5x7" in message
    with pytest.raises(LungMaskError, match="does not exist"):
        find_lung_masks(paths, tmp_path / "nowhere")


def test_cli_evaluate_names_missing_lung_masks(checkpoint, synthetic_root, tmp_path, capsys):
    (tmp_path / "masks").mkdir()
    with pytest.warns(UserWarning, match="Skipped 4 unusable file"):
            code = main(["evaluate", "resnet50_full", "--checkpoint", checkpoint, "--data-dir", str(synthetic_root),
                     "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet", "--lung-masks", str(tmp_path / "masks")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 16 image(s) have no mask") and "test_000.png" in err and "Traceback" not in err


def test_saliency_sentence_follows_the_numbers():
    def saliency(share: float, random_share: float, rho: float) -> dict:
        return {"lung_share": share, "lung_area_share": 0.28, "images": 32,
                "randomisation": {"lung_share": random_share, "spearman_mean": rho}}

    assert shortcuts.saliency_sentence(saliency(0.55, 0.30, 0.1)) == (
        "Grad-CAM puts 55% of its mass inside the lung field, which covers 28% of the input: more than a uniform "
        "map would (32 test images); re-initialising the trained layers changes them (Spearman 0.10), so they "
        "depend on what was learned.")
    assert "less than a uniform map" in shortcuts.saliency_sentence(saliency(0.15, 0.30, 0.8))
    assert "show the architecture more than what was learned" in shortcuts.saliency_sentence(saliency(0.15, 0.3, 0.8))
    assert "too coarse" in shortcuts.saliency_sentence(saliency(0.2801, 0.2799, -0.07))


def test_randomised_copy_reinitialises_only_the_trained_layers():
    torch.manual_seed(0)
    model = build_model("resnet50", weights="none", trainable_blocks=0, image_size=32).eval()
    clone, reset = shortcuts.randomised_copy(model)
    head = [p for p in model.parameters() if p.requires_grad]
    assert reset == sum(p.numel() for p in head) > 0
    assert torch.equal(clone.backbone.conv1.weight, model.backbone.conv1.weight)
    assert not all(torch.equal(a, b) for a, b in zip(head, (p for p in clone.parameters() if p.requires_grad)))
    assert all(torch.equal(a, b) for a, b in zip(shortcuts.randomised_copy(model)[0].parameters(), clone.parameters()))


def test_saliency_share_per_class_and_randomisation_check():
    torch.manual_seed(0)
    model = build_model("resnet50", weights="none", image_size=96).eval()  # a 3x3 last stage: maps can place mass
    prep = preprocessing("resnet50", 96)
    side = Preprocessing.from_dict(prep).square_side
    rng = np.random.default_rng(0)
    squares = rng.integers(0, 256, (10, side, side), dtype=np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    lung = np.broadcast_to(geometric_lung_field(side), squares.shape)
    report = shortcuts.saliency_report(model, squares, lung, labels, labels, prep, CLASSES, count=8)
    assert report["images"] == 8 and set(report["lung_share_per_class"]) == set(CLASSES)  # every class drawn
    assert 0 <= report["lung_share"] <= 1 and 0.2 < report["lung_area_share"] < 0.4
    rho = report["randomisation"]["spearman_mean"]
    assert rho is not None and -1 <= rho <= 1
    assert report["randomisation"]["reinitialised_parameters"] == sum(p.numel() for p in model.parameters())
    assert shortcuts.saliency_sentence(report).startswith(f"Grad-CAM puts {report['lung_share']:.0%} of its mass")


def test_evaluation_scores_three_views_and_draws_them(checkpoint, synthetic_root, tmp_path):
    test_files = sorted(p.relative_to(synthetic_root).as_posix() for p in (synthetic_root / "test").rglob("*.*"))
    csv = tmp_path / "groups.csv"
    csv.write_text("file,source_repo\n" + "".join(f"{f},{'tiny' if i < 2 else 'main'}\n" for i, f in enumerate(test_files)))
    with pytest.warns(UserWarning, match="Skipped 4 unusable file"):
        metrics = evaluate_checkpoint(checkpoint, data_dir=synthetic_root, out=tmp_path,
                                      runtime=Runtime.create("cpu", progress=False), groups=(csv, "source_repo"))
    assert metrics["groups"]["column"] == "source_repo" and set(metrics["groups"]["groups"]) == {"main"}
    assert metrics["groups"]["too_small"]["tiny"]["images"] == 2 and metrics["groups"]["groups"]["main"]["images"] == 14
    checks = metrics["shortcuts"]
    assert set(checks["views"]) == set(shortcuts.VIEWS)
    assert checks["views"]["as_is"]["macro_f1"] == pytest.approx(metrics["macro_f1"])
    assert checks["sentence"] == lung_evidence.verdicts(checks["views"]["as_is"]["macro_f1"], checks["controls"],
                                                        checks["probes"], 0.25)["sentence"]
    assert set(checks["controls"]["views"]) == {f"{p}_{m}" for p in lung_evidence.PLACEMENTS for m in ("hidden", "only")}
    assert checks["probes"]["train_images"] > 0 and set(checks["probes"]) >= set(lung_evidence.PROBE_VIEWS)
    assert set(metrics["pairwise_auroc"]) >= {"NORMAL vs PNEUMONIA"} and len(metrics["pairwise_auroc"]) == 6
    assert (Path(metrics["folder"]) / "shortcuts.png").stat().st_size > 10_000
    assert checks["saliency"]["images"] == 16  # the whole test split: under the cap
    saved = json.loads((Path(metrics["folder"]) / "classification_report.json").read_text())
    assert saved["shortcuts"]["views"]["lungs_hidden"]["macro_f1"] == checks["views"]["lungs_hidden"]["macro_f1"]


def test_notebook_conclusion_includes_the_checks():
    test = {"accuracy": 0.7, "macro_f1": 0.68, "balanced_accuracy": 0.69,
            "per_class": {c: {"recall": 0.7} for c in CLASSES}, "ci95": {"macro_f1": [0.6, 0.75]}}
    metrics = {"experiment": "resnet50_full", "dataset": {"name": "d", "counts": {"test": {c: 5 for c in CLASSES}}},
               "weights": "none", "epochs_run": 1, "best_epoch": 1, "train_seconds": 3.0, "device": "cpu",
               "mixed_precision": "fp32", "best_val": {}, "test": test,
               "shortcut_baseline": {"test": {"macro_f1": 0.8, "ci95": {"macro_f1": [0.7, 0.9]}}},
               "shortcuts": {"controls": {"hidden": {}}, "sentence": "Hiding the lung field costs 0.01 macro-F1 ...",
                             "short": "Hiding the lungs costs no more than an equal area outside them.",
                             "saliency_sentence": None}}
    text = notebook.conclusion_text(metrics)
    assert "does no better than the shortcut baseline" in text and "(macro-F1 0.68 against 0.80)" in text
    assert text.endswith("Hiding the lungs costs no more than an equal area outside them.")
    del metrics["shortcuts"]["controls"]  # masked scores from before the control are not read for the lungs
    assert notebook.conclusion_text(metrics).endswith("so they say nothing about the lungs; re-evaluate it (`cxr evaluate`).")
