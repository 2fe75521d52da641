"""Figures that read well: nothing clipped, nothing covering anything else (checked on the drawn artists),
and the demo page names the model it runs."""

from __future__ import annotations

import json
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.transforms import Bbox

from cxr import notebook
from cxr.data.dataset import load_splits
from cxr.evaluate.figures import plot_history, plot_predictions, plot_roc
from cxr.data.layout import CLASSES
from cxr.inference.serve import model_header


def _box(artist, renderer) -> Bbox:
    return artist.get_window_extent(renderer)


def _drawn(figure):
    """The renderer of ``figure`` drawn as it is saved (Agg), so every artist has its final place."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def test_roc_title_fits_and_an_operating_point_at_the_edge_is_whole(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    probabilities = rng.dirichlet(np.ones(4), size=40)
    points = {name: {"sensitivity": 1.0, "specificity": 0.0} for name in CLASSES}  # at x = 1, y = 1
    title = "resnet50_full: test split: ROC (dots: operating points fixed on validation)"
    figure = plot_roc(labels, probabilities, CLASSES, tmp_path / "roc.png", title, points)
    renderer = _drawn(figure)
    axis = figure.axes[0]
    assert figure.bbox.contains(*_box(axis.title, renderer).min) and figure.bbox.contains(*_box(axis.title, renderer).max)
    assert axis.title.get_text().replace("\n", " ") == title
    dots = [line for line in axis.lines if line.get_marker() == "o"]
    assert len(dots) == 4 and not any(dot.get_clip_on() for dot in dots)
    assert axis.get_xlim()[1] > 1 and axis.get_ylim()[1] > 1
    plt.close(figure)


def test_prediction_grid_title_stays_above_the_first_row(synthetic_root, tmp_path):
    with pytest.warns(UserWarning, match="Skipped"):
        test = load_splits(synthetic_root).test
    labels = np.asarray(test.labels)
    probabilities = np.eye(4)[(labels + 1) % 4] * 0.7 + 0.075
    figure = plot_predictions(test.paths, labels, probabilities, CLASSES, tmp_path / "p.png",
                              count=8, title="resnet50_full: test split")
    renderer = _drawn(figure)
    title = _box(figure._suptitle, renderer)
    for axis in figure.axes[:4]:
        assert title.y0 >= _box(axis.title, renderer).y1  # no overlap with any first-row caption
    plt.close(figure)


def test_count_plot_legend_covers_no_bar_label(synthetic_root):
    with pytest.warns(UserWarning, match="Skipped"):
        splits = load_splits(synthetic_root)
    figure = notebook.plot_counts(splits)
    renderer = _drawn(figure)
    axis = figure.axes[0]
    legend = _box(axis.get_legend(), renderer)
    labels = [text for text in axis.texts if text.get_text()]
    assert labels and not any(legend.overlaps(_box(text, renderer)) for text in labels)
    assert all(axis.bbox.contains(*_box(text, renderer).max) for text in labels)  # inside the frame
    plt.close(figure)


def test_demo_header_names_experiment_commit_and_test_score(checkpoint, tmp_path):
    assert model_header(checkpoint) == ("Experiment `resnet50_full`, `best.pt` (epoch 1), commit `unknown`, "
                                        "test macro-F1 unknown (no metrics.json of this checkpoint beside it)")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, run / "checkpoints" / "best.pt")
    from cxr.models.checkpoint import load_checkpoint

    config = load_checkpoint(checkpoint)["experiment"]
    metrics = {"config": config, "best_epoch": 1, "git_commit": "0123abc", "date": "2026-12-03",
               "test": {"macro_f1": 0.8254, "ci95": {"macro_f1": [0.8, 0.85]}}, "dataset": {"name": "d"}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert model_header(run / "checkpoints" / "best.pt") == (
        "Experiment `resnet50_full`, `best.pt` (epoch 1), commit `0123abc`, test macro-F1 0.825 (95% CI 0.800-0.850)")
    (run / "metrics.json").write_text(json.dumps({**metrics, "best_epoch": 7}))  # another checkpoint's scores
    assert "test macro-F1 unknown" in model_header(run / "checkpoints" / "best.pt")


def _row(epoch: int, loss: float) -> dict[str, float]:
    return {"epoch": epoch, "train_loss": loss, "val_loss": loss, "train_accuracy": 0.5, "val_accuracy": 0.5,
            "val_macro_f1": 0.4}


def test_epoch_axis_has_whole_numbers_only(tmp_path):
    """The training curves read for one epoch (one whole-number tick) and for a diverging run (below)."""
    figure = plot_history([_row(1, 1.3)], tmp_path / "curves.png")
    for axis in figure.axes:
        ticks = [tick for tick in axis.get_xticks() if axis.get_xlim()[0] <= tick <= axis.get_xlim()[1]]
        assert ticks == [1.0]
    assert (tmp_path / "curves.png").stat().st_size > 0
    plt.close(figure)


def test_loss_axis_turns_logarithmic_only_when_the_loss_spans_decades():
    diverging, ordinary = plot_history([_row(1, 5e6), _row(2, 1.2)]), plot_history([_row(1, 1.4), _row(2, 0.9)])
    assert diverging.axes[0].get_yscale() == "log"
    assert ordinary.axes[0].get_yscale() == "linear"
    plt.close("all")


def test_panels_follow_the_metrics_the_table_records_per_epoch(monkeypatch):
    """curves.png: the loss, then one panel per history metric of the table, train and validation where
    the history has both; a metric the table stops recording leaves the figure."""
    from cxr.evaluate import metrics

    figure = plot_history([_row(1, 1.3), _row(2, 1.1)])
    assert [axis.get_title() for axis in figure.axes] == ["Loss"] + [
        m.label[:1].upper() + m.label[1:] for m in metrics.METRICS if m.history]
    accuracy, macro_f1 = figure.axes[1:]
    assert [line.get_label() for line in accuracy.lines] == ["train accuracy", "validation accuracy"]
    assert [line.get_label() for line in macro_f1.lines] == ["validation macro-F1"]
    assert list(macro_f1.lines[0].get_ydata()) == [0.4, 0.4]
    monkeypatch.setattr(metrics, "METRICS", tuple(m if m.name != "accuracy" else
                                                  metrics.Metric(m.name, m.label, m.function) for m in metrics.METRICS))
    assert [axis.get_title() for axis in plot_history([_row(1, 1.3)]).axes] == ["Loss", "Macro-F1"]
    plt.close("all")
