"""``metrics.json`` as one typed, versioned record: what a training run, a ``cxr evaluate`` or an external
evaluation wrote, with one writer (:meth:`RunRecord.write` and its siblings) and one reader
(:func:`read_run_record`) that upgrades the files earlier versions wrote, so the committed runs still render.

The JSON stays flat and keeps the keys it always had (other tools and committed files read it), plus
``schema_version``. Version 1 is every file written before that field existed; :func:`upgrade` says what it
takes to read one. A test section stays the mapping the metrics table (:mod:`cxr.evaluate.metrics`) defines: adding a
metric adds a key there, never a field here; :class:`TestScores` reads the sections the checks write beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from cxr.evaluate import metrics

SCHEMA_VERSION = 2
FILE = "metrics.json"


class RunRecordError(ValueError):
    """A metrics.json that cannot be read as a record; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TestScores(Mapping):
    """One test section (``test``, ``test_without_overlaps``, ``tta``): the metrics table's scores, their
    bootstrap intervals under ``ci95`` and the checks' sections, read as a mapping or through the fields below."""

    scores: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.scores[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def accuracy(self) -> float | None:
        return self.scores.get("accuracy")

    @property
    def macro_f1(self) -> float | None:
        return self.scores.get("macro_f1")

    @property
    def images(self) -> int | None:
        return self.scores.get("images")

    @property
    def ci95(self) -> dict[str, Any]:
        """The bootstrap intervals ({} in files from before they existed)."""
        return self.scores.get("ci95") or {}

    @property
    def per_class(self) -> dict[str, dict[str, Any]]:
        return self.scores.get("per_class") or {}

    @property
    def pairwise_auroc(self) -> dict[str, Any]:
        return self.scores.get("pairwise_auroc") or {}

    @property
    def class_shares(self) -> dict[str, Any]:
        return self.scores.get("class_shares") or {}

    @property
    def groups(self) -> dict[str, Any]:
        """Scores per subgroup (``cxr evaluate --groups``); {} without them."""
        return self.scores.get("groups") or {}

    @property
    def tta(self) -> TestScores | None:
        """The test-time augmentation scores of ``cxr evaluate --tta``, or None."""
        tta = self.scores.get("tta")
        return TestScores(tta) if isinstance(tta, dict) else None

    def value(self, metric: metrics.Metric, name: str | None = None) -> float | None:
        """A metric's point value (per class: ``name``'s), None where this section predates it."""
        return metrics.stored_value(self.scores, metric, name)

    def interval(self, metric: metrics.Metric, name: str | None = None) -> Sequence[float] | None:
        """A metric's bootstrap interval, or None."""
        return metrics.stored_interval(self.scores, metric, name)

    def to_dict(self) -> dict[str, Any]:
        return self.scores


@dataclass(frozen=True)
class DatasetInfo:
    """Which dataset a run read (:func:`cxr.data.provenance.dataset_info`) and its images per split and class."""

    name: str | None = None
    root: str | None = None
    val_source: str | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    limit_per_class: int | None = None
    skipped_files: int | None = None

    def sizes(self) -> dict[str, int]:
        """Images per split, summed over classes."""
        return {split: sum(per_class.values()) for split, per_class in self.counts.items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class WeightsFile:
    """A local weights file a run started from: its name and SHA-256 (:func:`cxr.models.local_weights.weights_provenance`)."""

    name: str
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Timings:
    """What a training run cost: the training loop alone, and the whole command (audit, features, evaluation).
    Flat in the JSON (``train_seconds``, ``wall_seconds``)."""

    train_seconds: float | None = None
    wall_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FLAT = {"flat": True}  # a field whose record's keys sit at the top of the JSON


@dataclass(frozen=True)
class _Record:
    """What the three records share: the writer and the reader of the JSON's keys."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the order the record lists them, ``schema_version`` first."""
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name in ("extra", "source"):
                continue
            if item.metadata.get("flat"):
                out.update(value.to_dict())
            else:
                out[item.name] = value.to_dict() if hasattr(value, "to_dict") else value
        out.update(self.extra)
        return out

    def write(self, path: str | os.PathLike) -> Path:
        """The one writer of metrics.json (non-JSON values such as paths are written as text)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: Path | None = None) -> Any:
        """The record of an upgraded JSON object: keys it does not know are kept in ``extra`` and written back."""
        data = dict(data)
        data.pop("schema_version", None)
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            if item.name in ("extra", "source"):
                continue
            if item.metadata.get("flat"):
                nested = [f.name for f in dataclasses.fields(Timings)]
                values[item.name] = Timings(**{k: data.pop(k) for k in nested if k in data})
            elif item.name in data:
                values[item.name] = _PARSERS.get(item.name, _same)(data.pop(item.name))
        return cls(**values, extra=data, source=source)

    @property
    def label(self) -> str:
        """The experiment's name, else the name of the folder the record came from."""
        return str(getattr(self, "experiment", None) or (self.source.parent.name if self.source else "?"))


def _same(value: Any) -> Any:
    return value


def _table(name: str, build: Callable[..., Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise RunRecordError(f"'{name}' is not a table")
        return build(**value) if build is not TestScores else TestScores(value)
    return parse


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "test": _table("test", TestScores),
    "test_without_overlaps": _table("test_without_overlaps", TestScores),
    "dataset": _table("dataset", DatasetInfo),
    "weights_file": _table("weights_file", WeightsFile),
}


@dataclass(frozen=True)
class RunRecord(_Record):
    """The metrics.json of one ``cxr train``: its recipe, data, audit, where and how it ran, and its scores."""

    experiment: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    weights_file: WeightsFile | None = None
    epochs_run: int | None = None
    best_epoch: int | None = None
    stopped_early: bool | None = None
    seed: int | None = None
    deterministic: bool | None = None
    dataset: DatasetInfo | None = None
    added_training: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None
    shortcut_baseline: dict[str, Any] | None = None
    device: str | None = None
    mixed_precision: str | None = None
    pipeline: dict[str, Any] | None = None
    torch: str | None = None
    python: str | None = None
    timings: Timings = field(default_factory=Timings, metadata=FLAT)
    git_commit: str | None = None
    date: str | None = None
    best_val: dict[str, float] = field(default_factory=dict)
    test: TestScores = field(default_factory=TestScores)
    shortcuts: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    figures_not_written: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False)

    @property
    def planned_epochs(self) -> int | None:
        return self.config.get("epochs")


@dataclass(frozen=True)
class EvaluationRecord(_Record):
    """The metrics.json of one ``cxr evaluate``: only what the evaluation and its checkpoint say."""

    experiment: str | None = None
    kind: str = "evaluation"
    evaluated_checkpoint: str | None = None
    checkpoint_epoch: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    seed: int | None = None
    dataset: DatasetInfo | None = None
    device: str | None = None
    torch: str | None = None
    python: str | None = None
    wall_seconds: float | None = None
    git_commit: str | None = None
    date: str | None = None
    test: TestScores = field(default_factory=TestScores)
    shortcuts: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ExternalRecord(_Record):
    """The metrics.json of one external folder scored by a trained model (:mod:`cxr.external`)."""

    experiment: str | None = None
    checkpoint: str | None = None
    external: dict[str, Any] = field(default_factory=dict)
    trained_on: dict[str, Any] | None = None
    overlaps: dict[str, Any] = field(default_factory=dict)
    test: TestScores = field(default_factory=TestScores)
    test_without_overlaps: TestScores | None = None
    shortcuts: dict[str, Any] | None = None
    shortcut_baseline: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False)

    @property
    def folder(self) -> str:
        """The external folder's name."""
        return str(self.external.get("folder", "?"))


AnyRecord = Union[RunRecord, EvaluationRecord, ExternalRecord]


def upgrade(data: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics.json object of any version, in the current version's shape. Version 1 (no ``schema_version``:
    every file written before it existed, the committed H100 runs among them) lacks the keys later runs added:
    ``weights_file``, ``added_training``, ``shortcut_baseline``, ``shortcuts``, ``figures_not_written``,
    ``dataset.limit_per_class``, ``test.ci95`` and the checks' sections. Each reads as absent (None, or an
    empty table), which is what its readers show as n/a; nothing else changed between the versions, and keys
    a version does not know (a hand-written ``commit_note``) are kept."""
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version < 1:
        raise RunRecordError(f"has schema_version {version!r}, which is not a version number")
    if version > SCHEMA_VERSION:
        raise RunRecordError(f"was written by a newer cxr (schema_version {version}, this one reads up to "
                             f"{SCHEMA_VERSION}); update cxr")
    upgraded = dict(data)
    if isinstance(upgraded.get("dataset"), dict):  # version 1: runs without --limit wrote no limit
        upgraded["dataset"] = {"limit_per_class": None, **upgraded["dataset"]}
    upgraded["schema_version"] = SCHEMA_VERSION
    return upgraded


def record_from_dict(data: Mapping[str, Any], source: Path | None = None) -> AnyRecord:
    """The record a metrics.json object holds (any version): an evaluation says ``kind``, an external
    evaluation has an ``external`` table, anything else is a training run."""
    if not isinstance(data, Mapping):
        raise RunRecordError("is not a JSON object")
    data = upgrade(data)
    if data.get("kind") == "evaluation":
        return EvaluationRecord.from_dict(data, source)
    if isinstance(data.get("external"), dict):
        return ExternalRecord.from_dict(data, source)
    return RunRecord.from_dict(data, source)


def as_record(run: AnyRecord | Mapping[str, Any]) -> AnyRecord:
    """A record, from a record or from the dict :func:`cxr.workflow.train_experiment` returns (its ``folder`` is
    left out; a ``_path`` naming the file it came from becomes the record's ``source``)."""
    if isinstance(run, _Record):
        return run
    data = dict(run)
    data.pop("folder", None)  # where the run wrote: not a part of its file
    where = data.pop("_path", None)
    return record_from_dict(data, Path(where) if where is not None else None)


def test_section(value: AnyRecord | Mapping[str, Any]) -> TestScores:
    """The test scores of a record, of a metrics dict (``value["test"]``) or of a bare test section (what
    ``cxr evaluate`` returns and prints)."""
    if isinstance(value, _Record):
        return value.test
    if isinstance(value, TestScores):
        return value
    return TestScores(dict(value["test"] if isinstance(value.get("test"), Mapping) else value))


def read_run_record(path: str | os.PathLike) -> AnyRecord:
    """The one reader of metrics.json: the file's record, upgraded from the version that wrote it. A file that
    is not JSON or not a record is a :class:`RunRecordError` naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else str(error)
        raise RunRecordError(f"Could not read {str(path)!r} ({reason})") from None
    try:
        return record_from_dict(data, path)
    except (RunRecordError, TypeError) as error:
        raise RunRecordError(f"{str(path)!r} {error}") from None
