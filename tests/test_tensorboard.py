"""cxr train writes TensorBoard event files: per-epoch curves, test metrics, confusion matrix, hyperparameters."""

import json
import shutil

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from cxr.cli import main
from cxr.data.layout import CLASSES
from cxr.train.tensorboard_log import EPOCH_TAGS

FLAGS = ["--batch-size=8", "--image-size=32", "--weights=none", "--device=cpu", "--quiet"]


@pytest.fixture(scope="module")
def run(synthetic_root, tmp_path_factory):
    """Two epochs of the fastest experiment through the CLI, and its events read back."""
    out = tmp_path_factory.mktemp("tensorboard")
    with pytest.MonkeyPatch.context() as patch, pytest.warns(UserWarning, match="Skipped"):
        patch.setenv("CXR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cxr-cache"))
        assert main(["train", "mobilenet_v2_head", f"--data-dir={synthetic_root}", f"--out={out}", "--epochs=2", *FLAGS]) == 0
    events = EventAccumulator(str(out / "mobilenet_v2_head" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    yield out / "mobilenet_v2_head", events
    shutil.rmtree(out / "mobilenet_v2_head" / "checkpoints")  # hundreds of MB


def scalars(events, tag):
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_every_epoch_logs_losses_accuracy_macro_f1_and_learning_rate(run):
    folder, events = run
    history = pd.read_csv(folder / "history.csv")
    for column, tag in EPOCH_TAGS.items():
        assert scalars(events, tag) == [(epoch, pytest.approx(value, rel=1e-6))
                                        for epoch, value in zip(history["epoch"], history[column])], tag


def test_the_final_test_metrics_and_confusion_matrix_are_logged(run):
    folder, events = run
    metrics = json.loads((folder / "metrics.json").read_text())
    test = metrics["test"]
    for key in ("accuracy", "macro_f1", "balanced_accuracy"):
        assert scalars(events, f"test/{key}") == [(2, pytest.approx(test[key], rel=1e-6))]
    for name in CLASSES:
        assert scalars(events, f"test/recall_{name}") == [(2, pytest.approx(test["per_class"][name]["recall"]))]
    assert "test/confusion_matrix" in events.Tags()["images"]
    table = events.Tensors("test/confusion_matrix/text_summary")[0].tensor_proto.string_val[0].decode()
    rows = [line.split("|")[2:-1] for line in table.splitlines()[2:]]
    assert sum(int(n) for row in rows for n in row) == sum(c["support"] for c in test["per_class"].values())


def test_the_configuration_is_logged_as_hyperparameters(run):
    folder, events = run
    metrics = json.loads((folder / "metrics.json").read_text())
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    logged = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert logged["lr"].number_value == metrics["config"]["lr"]
    assert logged["epochs"].number_value == 2 and logged["seed"].number_value == metrics["seed"]
    assert logged["arch"].string_value == "mobilenet_v2" and logged["trainable_blocks"].number_value == 0


def test_no_tensorboard_writes_no_event_files(synthetic_root, tmp_path):
    with pytest.warns(UserWarning, match="Skipped"):
        assert main(["train", "mobilenet_v2_head", f"--data-dir={synthetic_root}", f"--out={tmp_path}", "--epochs=1",
                     "--no-tensorboard", *FLAGS]) == 0
    assert (tmp_path / "mobilenet_v2_head" / "metrics.json").is_file()
    assert not (tmp_path / "mobilenet_v2_head" / "tensorboard").exists()
    shutil.rmtree(tmp_path / "mobilenet_v2_head" / "checkpoints")
