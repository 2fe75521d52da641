"""Planted-cue cases for the lung checks: each verdict on a set built to make it true and one built to make it false.

Three synthetic sets (cxr.data.synthetic.write_cue_dataset, 48 px): the class only inside the lung field (a blob
at one of four places in the lungs), the class only in the border (its brightness outside the lung field;
the blob's place random), and a random-weights network that must never be said to rely on the lungs.
The transparent model reads 6 x 6 cell means (its pooled features) with a logistic head fit on the
training split as is, so where it looks is known by construction.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from cxr.audit import checks
from cxr.evaluate import lung_evidence
from cxr.evaluate import shortcuts
from cxr.data.dataset import scan_split
from cxr.data.layout import CLASSES
from cxr.data.lung_field import geometric_lung_field
from cxr.models.classifier import preprocessing
from cxr.data.preprocessing import Preprocessing
from cxr.common.runtime import Runtime
from cxr.data.synthetic import write_cue_dataset

PREP = preprocessing("resnet50", 32)
LIGHT = tuple(c for c in checks.CHECKS if c[1] is not checks.saliency)  # Grad-CAM needs a torchvision arch


class FirstChannel(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, :1]


class CellMeans(nn.Module):
    """Pooled features = the mean of each of 8 x 8 cells (the grey image's one channel); a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(FirstChannel(), nn.AdaptiveAvgPool2d(8), nn.Flatten())
        self.head = nn.Linear(64, len(CLASSES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class RandomConvNet(CellMeans):
    """A small convolutional network left at its random initialisation (seeded), global average pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, len(CLASSES))


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime.create("cpu", cache=False, progress=False)


@pytest.fixture(scope="module")
def cue_sets(tmp_path_factory) -> dict:
    counts = {"train": 25, "test": 20}
    return {cue: write_cue_dataset(tmp_path_factory.mktemp(f"planted-{cue}") / "data",
                                   None if cue == "lungs" else cue, counts) for cue in ("lungs", "border_only")}


def fit_head(model: nn.Module, root: Path, runtime: Runtime) -> nn.Module:
    """Fit the model's linear head on its pooled features of the training split as is (a logistic regression)."""
    train = scan_split(root, "train")
    side = Preprocessing.from_dict(PREP).square_side
    squares = shortcuts.decoded_squares(train, side, runtime)
    lung = np.broadcast_to(geometric_lung_field(side), squares.shape)
    features, _ = lung_evidence.view_outputs(model, squares, lung, "as_is", PREP, runtime, 32)
    mean, std = features.mean(0), features.std(0) + 1e-6
    regression = LogisticRegression(C=10.0, max_iter=5000).fit((features - mean) / std, train.labels)
    weight = regression.coef_ / std  # the standardisation folded into the linear head
    with torch.no_grad():
        model.head.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        model.head.bias.copy_(torch.as_tensor(regression.intercept_ - weight @ mean, dtype=torch.float32))
    return model.eval()


def lung_checks(model: nn.Module, root: Path, runtime: Runtime, out: Path) -> dict:
    """The checks of the test split (saliency left out), as cxr evaluate runs them."""
    test, train = scan_split(root, "test"), scan_split(root, "train")
    side = Preprocessing.from_dict(PREP).square_side
    squares = shortcuts.decoded_squares(test, side, runtime)
    lung = np.broadcast_to(geometric_lung_field(side), squares.shape)
    logits = lung_evidence.view_outputs(model, squares, lung, "as_is", PREP, runtime, 32)[1]
    evidence = checks.Evidence(model, test, logits, np.asarray(test.labels), PREP, runtime, out, 32, train=train)
    return checks.run_checks(evidence, LIGHT)


@pytest.fixture(scope="module")
def results(cue_sets, runtime, tmp_path_factory) -> dict:
    torch.manual_seed(0)
    found = {cue: lung_checks(fit_head(CellMeans(), root, runtime), root, runtime, tmp_path_factory.mktemp(cue))
             for cue, root in cue_sets.items()}
    torch.manual_seed(0)
    random = RandomConvNet()
    found["random_border"] = lung_checks(fit_head(random, cue_sets["border_only"], runtime), cue_sets["border_only"],
                                         runtime, tmp_path_factory.mktemp("random_border"))
    torch.manual_seed(0)
    untouched = RandomConvNet().eval()
    found["random_lungs"] = lung_checks(untouched, cue_sets["lungs"], runtime, tmp_path_factory.mktemp("random_lungs"))
    return found


def test_label_inside_the_lungs_is_attributed_to_the_lungs(results):
    found = results["lungs"]["shortcuts"]
    assert found["views"]["as_is"]["macro_f1"] > 0.8
    assert {"lungs_needed", "lungs_alone_more", "outside_not_readable", "lungs_readable"} <= set(found["cases"])
    assert found["controls"]["hidden"]["attributed_to_lungs"] and found["controls"]["hidden"]["ci95"][0] > 0
    assert "the model's decisions depend on the lungs" in found["sentence"]


def test_label_in_the_border_is_never_attributed_to_the_lungs(results):
    found = results["border_only"]["shortcuts"]
    assert found["views"]["as_is"]["macro_f1"] > 0.7
    assert "lungs_needed" not in found["cases"] and not found["controls"]["hidden"]["attributed_to_lungs"]
    assert {"outside_needed_more", "outside_readable", "lungs_not_readable"} <= set(found["cases"])
    assert "lungs_alone_more" not in found["cases"]
    assert "can be read without the lungs" in found["sentence"] and "depend on the lungs" not in found["sentence"]


@pytest.mark.parametrize("case", ["random_border", "random_lungs"])
def test_a_random_weights_model_is_never_said_to_rely_on_the_lungs(results, case):
    found = results[case]["shortcuts"]
    assert "lungs_needed" not in found["cases"] and "depend on the lungs" not in found["sentence"]
    if case == "random_border":  # its head reads the border well: the control, not the chance guard, decides
        assert found["views"]["as_is"]["macro_f1"] > 0.5 and "at_chance" not in found["cases"]
    else:
        assert "at_chance" in found["cases"]


def test_probes_report_every_view_with_intervals(results):
    probes = results["lungs"]["shortcuts"]["probes"]
    assert probes["train_images"] == 100 and "class_weight='balanced'" in probes["settings"]
    for view in lung_evidence.PROBE_VIEWS:
        low, high = probes[view]["ci95"]["macro_f1"]
        assert low <= probes[view]["macro_f1"] <= high
    assert probes["lungs_only"]["macro_f1"] > 0.8 > 0.45 > probes["lungs_hidden"]["macro_f1"]


def test_control_regions_match_the_lung_area_and_stay_outside_it():
    lung = torch.from_numpy(np.broadcast_to(geometric_lung_field(40), (2, 40, 40)).copy())[:, None]
    for placement in lung_evidence.PLACEMENTS:
        region = lung_evidence.control_region(lung, placement)
        assert not (region & lung).any()
        assert region.sum() == lung.sum()
    top = lung_evidence.control_region(lung, "top")[0, 0]
    assert top[0].all() and not top[-1].any()
    sides = lung_evidence.control_region(lung, "sides")[0, 0]
    assert sides[:, 0].all() and sides[:, -1].all() and not sides[:, 20].any()


def test_a_lung_field_larger_than_its_outside_gets_all_of_the_outside():
    lung = torch.ones(1, 1, 10, 10, dtype=torch.bool)
    lung[..., :2, :] = False
    region = lung_evidence.control_region(lung, "bottom")
    assert torch.equal(region, ~lung)


def _controls(hidden: tuple[float, float], only: tuple[float, float]) -> dict:
    return {"hidden": {"lungs_drop": 0.4, "control_drop": 0.1, "difference": sum(hidden) / 2, "ci95": list(hidden)},
            "only": {"lungs": 0.7, "control": 0.3, "difference": sum(only) / 2, "ci95": list(only)}}


def _probes(outside: tuple[float, float], inside: tuple[float, float]) -> dict:
    def view(interval):
        return {"macro_f1": sum(interval) / 2, "ci95": {"macro_f1": list(interval)}}

    return {"as_is": view((0.9, 0.95)), "lungs_hidden": view(outside), "lungs_only": view(inside)}


@pytest.mark.parametrize("hidden, case", [((0.05, 0.2), "lungs_needed"), ((-0.2, -0.01), "outside_needed_more"),
                                          ((-0.05, 0.1), "drop_not_lungs")])
def test_each_masked_case_follows_its_interval(hidden, case):
    found = lung_evidence.verdicts(0.9, _controls(hidden, (-0.1, 0.1)), None, 0.25)
    assert found["cases"] == [case, "lungs_alone_same"]
    assert ("depend on the lungs" in found["sentence"]) == (case == "lungs_needed")
    assert ("depends on the lungs" in found["short"]) == (case == "lungs_needed")
    assert found["short"].endswith("the lungs alone keep as much as an equal area (+0.00, 95% interval -0.10 to +0.10).")


@pytest.mark.parametrize("only, case", [((0.1, 0.3), "lungs_alone_more"), ((-0.3, -0.1), "lungs_alone_less")])
def test_each_shown_alone_case_follows_its_interval(only, case):
    assert lung_evidence.verdicts(0.9, _controls((-0.1, 0.1), only), None, 0.25)["cases"][1] == case


def test_probe_cases_need_the_whole_interval_above_chance():
    found = lung_evidence.verdicts(0.9, _controls((0.1, 0.2), (0.1, 0.2)), _probes((0.85, 0.95), (0.29, 0.5)), 0.25)
    assert found["cases"][2:] == ["outside_readable", "lungs_not_readable"]
    assert "Outside the lung field alone, a linear probe on the model's features reaches macro-F1 0.90" in found["sentence"]
    found = lung_evidence.verdicts(0.9, _controls((0.1, 0.2), (0.1, 0.2)), _probes((0.2, 0.3), (0.31, 0.5)), 0.25)
    assert found["cases"][2:] == ["outside_not_readable", "lungs_readable"]


def test_a_model_at_chance_gets_no_masked_verdict():
    found = lung_evidence.verdicts(0.27, _controls((0.1, 0.2), (0.1, 0.2)), None, 0.25)
    assert found["cases"] == ["at_chance"] and "cannot say what the model uses" in found["sentence"]


def test_paired_difference_interval_is_paired():
    labels = np.repeat(np.arange(4), 10)
    same = lung_evidence.paired_difference(labels, [labels], [labels], 4)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]  # identical predictions: no spread at all
    worse = labels.copy()
    worse[::4] = (worse[::4] + 1) % 4
    found = lung_evidence.paired_difference(labels, [labels], [worse], 4)
    assert found["difference"] > 0 and 0 < found["ci95"][0] <= found["difference"] <= found["ci95"][1]


class _RecordsBackboneDtype(nn.Module):
    """A backbone and head that note the dtype the backbone computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, len(CLASSES))
        self.dtypes: list[torch.dtype] = []
        self.backbone.register_forward_hook(lambda module, inputs, output: self.dtypes.append(output.dtype))


@pytest.mark.parametrize("view", ["as_is", "lungs_hidden", "top_only"])
def test_the_probes_feature_pass_runs_with_the_cuda_choices(view, runtime, cuda_like):
    """On a GPU the probes' features come from a bf16 autocast pass over channels_last batches; on the CPU with
    the same choices they are float32 arrays that agree with the plain fp32 pass to bf16's precision."""
    torch.manual_seed(0)
    model = _RecordsBackboneDtype()
    side = Preprocessing.from_dict(PREP).square_side
    squares = np.random.default_rng(0).integers(0, 256, (6, side, side), dtype=np.uint8)
    lung = np.broadcast_to(geometric_lung_field(side), squares.shape)
    plain = lung_evidence.view_outputs(model, squares, lung, view, PREP, runtime, 4)
    assert model.dtypes == [torch.float32, torch.float32]
    model.dtypes.clear()
    mixed = lung_evidence.view_outputs(model, squares, lung, view, PREP, cuda_like, 4)
    assert model.dtypes == [torch.bfloat16, torch.bfloat16]  # two batches, each under autocast
    for fp32, bf16 in zip(plain, mixed):
        assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
        np.testing.assert_allclose(bf16, fp32, atol=0.05, rtol=0.05)
