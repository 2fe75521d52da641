"""Checkpoints: atomic writes, safe loading, and refusing checkpoints that belong to something else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cxr.models.checkpoint import FORMAT, CheckpointError, CheckpointWriter, load_checkpoint, save_checkpoint
from cxr.config import experiment_from_dict, get_experiment
from cxr.data.layout import CLASSES
from cxr.models.classifier import build_model


def checkpoint_state(model: nn.Module, name: str = "resnet50_full", epoch: int = 3) -> dict:
    return {
        "model": model.state_dict(),
        "experiment": get_experiment(name, epochs=epoch).to_dict(),
        "classes": list(CLASSES),
        "epoch": epoch,
    }


def test_round_trip_keeps_tensors_classes_and_config(tmp_path):
    model = nn.Linear(3, len(CLASSES))
    path = save_checkpoint(checkpoint_state(model), tmp_path / "checkpoints" / "best.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]  # no temporary file left behind
    state = load_checkpoint(path, experiment="resnet50_full", arch="resnet50", classes=CLASSES)
    assert state["format"] == FORMAT and state["epoch"] == 3
    assert state["classes"] == list(CLASSES)
    assert experiment_from_dict(state["experiment"]) == get_experiment("resnet50_full", epochs=3)
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt(), Boom("pickling failed")],
                         ids=["disk-full", "ctrl-c", "pickling-error"])
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pt"
    save_checkpoint(checkpoint_state(nn.Linear(3, 4), epoch=1), path)

    def dies_half_way(obj, target, *args, **kwargs):  # a partial file exists when the error comes
        Path(target).write_bytes(b"half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", dies_half_way)
    expected = CheckpointError if isinstance(error, OSError) else type(error)
    with pytest.raises(expected):
        save_checkpoint(checkpoint_state(nn.Linear(3, 4), epoch=2), path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(path)["epoch"] == 1


class Payload:
    """Unpickling this runs code; a safe loader must refuse it instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "model": {}, "experiment": {}, "classes": list(CLASSES), "epoch": 1,
                "extra": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused without running them"):
        load_checkpoint(path)
    assert not marker.exists()


def test_checkpoints_of_something_else_are_refused(tmp_path):
    path = save_checkpoint(checkpoint_state(nn.Linear(3, 4), name="vit_b16_head"), tmp_path / "vit.pt")
    with pytest.raises(CheckpointError, match="belongs to experiment 'vit_b16_head', not 'resnet50_full'"):
        load_checkpoint(path, experiment="resnet50_full")
    with pytest.raises(CheckpointError, match="holds a 'vit_b_16' model, not 'resnet50'"):
        load_checkpoint(path, arch="resnet50")
    with pytest.raises(CheckpointError, match="trained on classes"):
        load_checkpoint(path, classes=["NORMAL", "PNEUMONIA"])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a cxr checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_serves_as_weights_file(tmp_path):
    """``--weights PATH`` accepts one of our checkpoints: backbone and head come back exactly."""
    torch.manual_seed(0)
    trained = build_model("resnet50", weights="none", image_size=32)
    path = save_checkpoint(checkpoint_state(trained), tmp_path / "best.pt")
    rebuilt = build_model("resnet50", weights=path, image_size=32)
    expected = trained.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in rebuilt.state_dict().items())


def test_a_best_epoch_is_serialised_once_and_later_epochs_leave_it_alone(tmp_path, monkeypatch):
    best, last = tmp_path / "checkpoints" / "best.pt", tmp_path / "checkpoints" / "last.pt"
    serialised = []
    original_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, target, *a, **k: (serialised.append(obj["epoch"]),
                                                                     original_save(obj, target, *a, **k)))
    writer = CheckpointWriter()
    writer.save(checkpoint_state(nn.Linear(3, 4), epoch=1), best, last)
    writer.wait()
    assert best.samefile(last)  # one file, two names
    writer.save(checkpoint_state(nn.Linear(3, 4), epoch=2), last)
    writer.wait()
    assert serialised == [1, 2]
    assert load_checkpoint(best)["epoch"] == 1 and load_checkpoint(last)["epoch"] == 2
    assert sorted(p.name for p in best.parent.iterdir()) == ["best.pt", "last.pt"]  # no temporary left behind


def test_without_hard_links_the_second_name_is_a_copy(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr("os.link", no_links)
    writer = CheckpointWriter()
    writer.save(checkpoint_state(nn.Linear(3, 4), epoch=4), tmp_path / "best.pt", tmp_path / "last.pt")
    writer.wait()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 4 and not (tmp_path / "last.pt").samefile(tmp_path / "best.pt")


def test_checkpoints_with_the_old_freeze_backbone_flag_still_load():
    old = {k: v for k, v in get_experiment("resnet152_head").to_dict().items() if k != "trainable_blocks"}
    assert experiment_from_dict({**old, "freeze_backbone": True}) == get_experiment("resnet152_head")
    trained = {k: v for k, v in get_experiment("resnet50_full").to_dict().items() if k != "trainable_blocks"}
    assert experiment_from_dict({**trained, "freeze_backbone": False}).trainable_blocks == "all"
    assert "freeze_backbone" not in get_experiment("resnet152_head").to_dict()
