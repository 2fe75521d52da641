"""Training-curve figure: readable for one epoch and for a diverging run."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from cxr.reporting import plot_history


def _row(epoch: int, loss: float) -> dict[str, float]:
    return {"epoch": epoch, "train_loss": loss, "val_loss": loss, "train_accuracy": 0.5, "val_accuracy": 0.5,
            "val_macro_f1": 0.4}


def test_epoch_axis_has_whole_numbers_only(tmp_path):
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
    from cxr import metrics

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
