"""The benchmark's data set builder and its verdicts (the benchmark itself runs on a GPU, not in tests)."""

import hashlib
import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from cxr.data import CLASSES, load_splits

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kaggle_proportions_add_up(benchmark):
    assert sum(benchmark.KAGGLE_TRAIN.values()) == 6326 and sum(benchmark.KAGGLE_TEST.values()) == 771
    assert benchmark.scaled_counts(benchmark.KAGGLE_TRAIN, 6326, 10) == benchmark.KAGGLE_TRAIN
    assert list(benchmark.KAGGLE_TRAIN) == list(CLASSES)


def test_builds_an_upscaled_kaggle_layout_once(benchmark, synthetic_root, tmp_path, monkeypatch):
    info = benchmark.build_kaggle_sized(synthetic_root, tmp_path, images=60, size=64, workers=2)
    root = Path(info["root"])
    assert not info["reused"] and (root / "train" / "TURBERCULOSIS").is_dir()
    splits = load_splits(root)
    train_counts = {name: count for name, count in info["counts"]["train"].items()}
    assert sum(train_counts.values()) == len(splits.train) + len(splits.val)
    assert train_counts["PNEUMONIA"] > train_counts["NORMAL"] > train_counts["COVID19"]
    files = sorted(root.rglob("*.jpg"))
    for path in files[:10]:
        with Image.open(path) as image:
            assert image.format == "JPEG" and 48 <= min(image.size) <= info["shorter_side_px"][1]
    assert len({hashlib.sha1(p.read_bytes()).hexdigest() for p in files}) == len(files)  # no identical copies
    monkeypatch.setattr(benchmark, "_write_upscaled", lambda job: pytest.fail("rebuilt a complete data set"))
    assert benchmark.build_kaggle_sized(synthetic_root, tmp_path, images=60, size=64, workers=2)["reused"]


def test_missing_source_is_a_clear_error(benchmark, tmp_path):
    with pytest.raises(SystemExit, match="--source"):
        benchmark.build_kaggle_sized(tmp_path / "nowhere", tmp_path, images=60, size=64, workers=1)


def test_targets_are_judged_on_the_measurements(benchmark):
    def row(ceiling, warm, checkpoint_seconds=0.1):
        return {"ceiling": {"images_per_second": ceiling}, "ours_cold": {"experiment_seconds": 30.0},
                "ours_warm": {"images_per_second": warm, "epochs": 10, "epoch_seconds": 2.0,
                              "checkpoint_seconds": checkpoint_seconds}}

    results = {"experiments": {"resnet152_head": row(4000, 3000), "resnet50_full": row(3600, 3300, 1.0),
                               "vit_b16_head": row(6000, 5600)},
               "totals": {"seed_style": 3000.0, "ours_cold": 130.0}}
    verdicts = benchmark.targets(results)
    assert verdicts["all three under 2 minutes, cold cache included"].startswith("missed: 130.0")
    assert verdicts["at least 25x faster than seed-style"].startswith("missed: 23.1x")
    assert verdicts["resnet152_head epochs >= 90% of its ceiling"] == "missed: 75%"
    assert verdicts["resnet50_full epochs >= 90% of its ceiling"] == "met: 92%"
    assert verdicts["vit_b16_head epochs >= 90% of its ceiling"] == "met: 93%"
    assert verdicts["resnet50_full checkpoints under 3% of an epoch"] == "missed: 5.0%"
    assert verdicts["vit_b16_head checkpoints under 3% of an epoch"] == "met: 0.5%"
