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
