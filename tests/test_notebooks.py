"""Notebook hygiene (no outputs, never blocking) and the `cxr.notebook` helpers they call.
The notebooks themselves run end to end through nbmake in smoke mode (see pyproject.toml)."""

import ast
import json
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import pytest
import torch

from cxr import notebook
from cxr.config import EXPERIMENTS
from cxr.data.dataset import load_splits
from cxr.data.layout import CLASSES
from cxr.models.classifier import build_model
from cxr.train.run_options import RunOptions
from cxr.common.runtime import Runtime

ROOT = Path(__file__).parents[1]
NOTEBOOKS = {
    "ch01_resnet152_finetune.ipynb": "resnet152_head",
    "ch02_resnet50_train.ipynb": "resnet50_full",
    "ch03_vit_finetune.ipynb": "vit_b16_head",
    "ch04_mobilenet_v2_cpu.ipynb": "mobilenet_v2_head",
}

ALL_NOTEBOOKS = sorted(p.name for p in ROOT.glob("*.ipynb"))


def code_cells(name: str) -> list:
    return [c for c in nbformat.read(ROOT / name, as_version=4).cells if c.cell_type == "code"]


def test_the_chapters_exist():
    assert set(NOTEBOOKS) <= set(ALL_NOTEBOOKS)


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_notebook_committed_clean(name):
    notebook_json = nbformat.read(ROOT / name, as_version=4)
    nbformat.validate(notebook_json)
    for cell in code_cells(name):
        assert cell.outputs == [], f"{name}: a cell has outputs; clear them before committing"
        assert cell.execution_count is None, f"{name}: a cell has an execution count; clear outputs"
    assert notebook_json.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_names_its_experiment_once_and_never_blocks(name):
    source = "\n".join(cell.source for cell in code_cells(name))
    assignments = [node for node in ast.walk(ast.parse(source))
                   if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXPERIMENT" for t in node.targets)]
    assert [ast.literal_eval(node.value) for node in assignments] == [NOTEBOOKS[name]]
    for blocking in ("kagglehub.login", "input(", "getpass"):
        assert blocking not in source


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_settings_smoke_mode(monkeypatch, restore_threads):
    monkeypatch.setenv("CXR_SMOKE", "1")
    monkeypatch.setenv("CXR_EPOCHS", "7")  # ignored: smoke mode is always one short epoch
    settings = notebook.settings("vit_b16_head")
    splits = load_splits(settings.data_dir)
    assert settings.smoke and settings.device == "cpu"
    assert settings.overrides == notebook.SMOKE_OVERRIDES
    assert settings.config.epochs == 1 and settings.config.weights == "none"
    assert settings.run_dir == settings.out / "vit_b16_head" and not settings.out.is_relative_to(ROOT)
    options = settings.run_options
    assert options["out"] == settings.out and options["runtime"].cache_dir.parent == settings.out.parent  # one temp folder
    assert options["runtime"].device == torch.device("cpu") and options["options"] == RunOptions()
    assert splits.counts()["test"] == {c: notebook.SMOKE_COUNTS["test"] for c in CLASSES}
    assert torch.get_num_threads() == 1


def test_settings_real_mode_reads_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CXR_SMOKE", raising=False)
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_EPOCHS", "2")
    monkeypatch.setenv("CXR_WEIGHTS", "None")
    settings = notebook.settings("resnet50_full")
    assert (settings.smoke, settings.data_dir, settings.out, settings.device) == (False, tmp_path, Path("assets"), None)
    assert settings.overrides == {"epochs": 2, "weights": "none"}
    assert settings.run_options == {"out": Path("assets"), "runtime": Runtime.create(None), "options": RunOptions(),
                                    "epochs": 2, "weights": "none"}
    assert settings.config.batch_size == EXPERIMENTS["resnet50_full"].batch_size

    explicit = notebook.settings("resnet50_full", data_dir=tmp_path / "elsewhere", out=tmp_path / "out")
    assert (explicit.data_dir, explicit.out) == (tmp_path / "elsewhere", tmp_path / "out")

    monkeypatch.delenv("CXR_EPOCHS")
    monkeypatch.delenv("CXR_WEIGHTS")
    monkeypatch.delenv("CXR_DATA_DIR")
    assert notebook.settings("resnet50_full").overrides == {}


@pytest.mark.parametrize("variable, value, message", [
    ("CXR_EPOCHS", "zero", "CXR_EPOCHS must be a whole number"),
    ("CXR_EPOCHS", "0", "CXR_EPOCHS must be a whole number"),
    ("CXR_WEIGHTS", "/no/such/file.pth", "CXR_WEIGHTS must be imagenet, none or the path"),
    ("CXR_LIMIT", "0", "CXR_LIMIT must be a whole number >= 1, got '0'"),
    ("CXR_LIMIT", "-5", "CXR_LIMIT must be a whole number >= 1, got '-5'"),
    ("CXR_IMAGE_SIZE", "small", "CXR_IMAGE_SIZE must be a whole number >= 1"),
])
def test_settings_reject_bad_environment(monkeypatch, variable, value, message):
    monkeypatch.delenv("CXR_SMOKE", raising=False)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=message):
        notebook.settings("resnet152_head")


def test_settings_quick_run_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CXR_SMOKE", raising=False)
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    for name, value in (("CXR_IMAGE_SIZE", "64"), ("CXR_LIMIT", "40"), ("CXR_OUT", str(tmp_path / "quick"))):
        monkeypatch.setenv(name, value)
    settings = notebook.settings("vit_b16_head")
    assert settings.config.image_size == 64 and settings.run_options["image_size"] == 64
    assert settings.data_options == {"data_dir": tmp_path, "limit": 40}
    assert settings.run_dir == tmp_path / "quick" / "vit_b16_head"
    assert settings.summary().loc["images per class and split", "value"] == "40"
    assert notebook.settings("vit_b16_head", out=tmp_path / "given").out == tmp_path / "given"  # the argument wins


def test_notebooks_train_the_model_they_show_and_display_every_figure():
    for name in NOTEBOOKS:
        source = "\n".join(cell.source for cell in code_cells(name))
        assert "model = settings.build_model()" in source and "model=model" in source
        assert "models.build_model" not in source  # the model is built once
        assert "workflow.prepare_data(**settings.data_options)" in source  # CXR_LIMIT reaches the data
        # the figures of the folder the run wrote, which is not assets/<experiment>/ when another run's results are there
        assert 'run_dir = metrics["folder"]' in source and "settings.run_dir" not in source
        for figure in ("confusion_matrix", "predictions", "cam", "reliability"):
            assert f'notebook.saved_figure(run_dir, "{figure}")' in source, (name, figure)
        assert "notebook.conclusion(run_dir)" in source


def test_saved_figure_notes_a_figure_the_run_did_not_write(tmp_path):
    from IPython.display import Image

    plt.figure().savefig(tmp_path / "cam.png")
    plt.close("all")
    shown = notebook.saved_figure(tmp_path, "cam")
    assert isinstance(shown, Image) and repr(shown) == f"[figure: {tmp_path / 'cam.png'}]"
    missing = notebook.saved_figure(tmp_path, "reliability")
    assert repr(missing) == missing._repr_markdown_() == "*The run wrote no `reliability.png`.*"


def test_the_conclusion_prints_as_text_on_a_terminal(tmp_path):
    """papermill --log-output shows a display's text/plain: it must be the conclusion, not an object's name."""
    from IPython.core.formatters import DisplayFormatter

    (tmp_path / "metrics.json").write_text(json.dumps(metrics_fixture()))
    shown = notebook.conclusion(tmp_path)  # the run's folder, or its metrics.json
    formats, _ = DisplayFormatter().format(shown)
    assert formats["text/plain"] == formats["text/markdown"] == notebook.conclusion_text(metrics_fixture())
    assert repr(notebook.conclusion(tmp_path / "metrics.json")) == formats["text/plain"]


def test_settings_reject_unknown_experiment():
    with pytest.raises(KeyError, match="unknown experiment"):
        notebook.settings("resnet18")


def test_data_tables_and_figures(synthetic_root):
    with pytest.warns(UserWarning, match="Skipped"):
        splits = load_splits(synthetic_root)
    counts = notebook.count_table(splits)
    assert counts.loc["total", "total"] == len(splits.train) + len(splits.val) + len(splits.test)
    assert list(counts.loc[list(CLASSES), "train"]) == list(splits.train.counts().values())

    weights = notebook.class_weight_table(splits)
    fewest = min(splits.train.counts(), key=splits.train.counts().get)
    assert weights["loss weight"].idxmax() == fewest

    for figure in (notebook.plot_counts(splits), notebook.plot_samples(splits, per_class=3)):
        assert figure.number not in plt.get_fignums()  # closed: a notebook shows it once, as the cell's value
    assert len(notebook.plot_samples(splits, per_class=3).axes) == 3 * len(CLASSES)


def test_parameter_table_shows_frozen_backbone_in_eval_mode():
    frozen = notebook.parameter_table(build_model("resnet50", weights="none", trainable_blocks=0))
    full = notebook.parameter_table(build_model("resnet50", weights="none"))
    assert frozen.loc["backbone", "trainable"] == 0 and frozen.loc["backbone", "mode during training"] == "eval"
    assert frozen.loc["total", "trainable"] == frozen.loc["head", "parameters"] == 2048 * len(CLASSES) + len(CLASSES)
    assert full.loc["total", "trainable"] == full.loc["total", "parameters"]
    assert full.loc["backbone", "mode during training"] == "train"


def test_trainable_share_shows_a_tiny_head_as_more_than_zero():
    table = notebook.parameter_table(build_model("vit_b_16", weights="none", trainable_blocks=0, image_size=32))
    head, total = table.loc["head", "parameters"], table.loc["total", "parameters"]
    share = table.loc["total", "trainable share"]
    assert head == 768 * len(CLASSES) + len(CLASSES) and share.endswith("%")
    assert float(share[:-1]) == pytest.approx(100 * head / total, rel=5e-3) and share != "0.00%"
    assert table.loc["head", "trainable share"] == "100%" and table.loc["backbone", "trainable share"] == "0%"


def test_live_curves_update_one_display(monkeypatch):
    import IPython.display

    shown, updates = [], []

    class Handle:
        def update(self, figure):
            updates.append(figure)

    def display(figure, display_id=False):
        shown.append(figure)
        return Handle() if display_id else None

    monkeypatch.setattr(IPython.display, "display", display)
    curves = notebook.LiveCurves("test")
    row = {"train_loss": 1.0, "val_loss": 1.1, "train_accuracy": 0.4, "val_accuracy": 0.3, "val_macro_f1": 0.2}
    history = [{"epoch": 1, **row}]
    curves(history)
    history.append({"epoch": 2, **row})
    curves(history)
    assert len(shown) == 1 and len(updates) == 1
    assert len(updates[0].axes[0].lines[0].get_xdata()) == 2
    assert not plt.get_fignums()


def metrics_fixture(ci95=None) -> dict:
    recalls = [0.9, 0.4, 0.7, 0.8]
    return {
        "experiment": "resnet50_full", "weights": "none", "epochs_run": 3, "best_epoch": 2, "stopped_early": False,
        "device": "cpu (2 cores)", "mixed_precision": "fp32", "train_seconds": 12.0,
        "dataset": {"name": "cxr-sample", "counts": {s: {c: n for c in CLASSES} for s, n in
                                                      (("train", 10), ("val", 2), ("test", 5))}},
        "best_val": {"val_macro_f1": 0.61},
        "test": {"accuracy": 0.7, "macro_f1": 0.68, "balanced_accuracy": 0.69,
                 "per_class": {c: {"precision": 0.7, "recall": r, "f1": 0.7, "support": 5} for c, r in zip(CLASSES, recalls)},
                 "macro_avg": {"precision": 0.7, "recall": 0.69, "f1": 0.68},
                 "weighted_avg": {"precision": 0.7, "recall": 0.7, "f1": 0.68},
                 **({"ci95": ci95} if ci95 else {})},
    }


def test_conclusion_and_report_table_come_from_metrics():
    text = notebook.conclusion_text(metrics_fixture())
    assert "40 training, 8 validation, 20 test images" in text
    assert "accuracy **0.700**" in text and "macro-F1 **0.680**" in text
    assert "Best recalled class: COVID19 (0.900); weakest: NORMAL (0.400)" in text
    with_ci = notebook.conclusion_text(metrics_fixture({"accuracy": [0.6, 0.8], "recall": {"NORMAL": [0.2, 0.6]}}))
    assert "accuracy **0.700 (0.600-0.800)**" in with_ci and "NORMAL (0.400 (0.200-0.600))" in with_ci

    table = notebook.classification_table(metrics_fixture())
    assert list(table.index) == [*CLASSES, "macro avg", "weighted avg"]
    assert table.loc["NORMAL", "recall"] == 0.4 and table.loc["macro avg", "support"] == 20
