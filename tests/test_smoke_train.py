import json

from cxr.cli import main


def test_train_cli_writes_assets(synthetic_root, tmp_path):
    code = main(["train", "resnet50_full", "--data-dir", str(synthetic_root), "--epochs", "1", "--batch-size", "8",
                 "--image-size", "32", "--weights", "none", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    metrics = json.loads((tmp_path / "resnet50_full" / "metrics.json").read_text())
    assert 0 <= metrics["test"]["accuracy"] <= 1
