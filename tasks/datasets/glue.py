"""GLUE as shipped by `download_glue_data.py`: one TSV per split, read into typed examples.

The files are tab-separated with quoting off (a `"` is a literal character: MRPC and SST-2 have
unbalanced ones), UTF-8, sometimes with a BOM (MRPC). Columns are found by header name, so MNLI's
12-column train and 16-column dev files read alike; CoLA's train and dev files have no header
(`source, label, original label, sentence`), its test file has one. A test file has no label
column: its examples have `label=None`.

Labels keep the type they have in the files: `int` for 0/1 tasks (CoLA, SST-2, MRPC, QQP, WNLI),
`str` class names for MNLI, QNLI, RTE, `float` scores in [0, 5] for STS-B.

The Hugging Face `nyu-mll/glue` layout (`<task>/<split>-*.parquet`, columns such as `sentence`,
`premise`/`hypothesis`, an integer `label` that is -1 in test splits, `idx`) reads into the same
examples, its class indices mapped to the TSV files' class names.
"""
from __future__ import annotations

import csv
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tasks.datasets.badrows import BadRow, OnBad
from tasks.datasets.base import DatasetError

Label = int | str | float


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task's TSV files are laid out, and its label set.

    Column names are lower-case header names, the first present one wins. `labels` are the classes
    as written in the files (empty for the regression task); `headerless` names the columns of
    files shipped without a header.
    """

    name: str
    text_a: tuple[str, ...]
    text_b: tuple[str, ...] = ()
    label: tuple[str, ...] = ("label",)
    labels: tuple[str, ...] = ("0", "1")
    score_range: tuple[float, float] | None = None
    headerless: tuple[str, ...] = ()

    @property
    def is_regression(self) -> bool:
        return self.score_range is not None

    @property
    def num_labels(self) -> int:
        """Output size of a classifier head (1 for the regression task)."""
        return 1 if self.is_regression else len(self.labels)


@dataclass(frozen=True)
class GlueExample:
    """One row: `id` is the file's `index`/`id` column, else the row's number (0-based) among data rows;
    `line` is its 1-based line in the TSV (Parquet: its row), for messages about it."""

    id: str
    text_a: str
    text_b: str | None
    label: Label | None
    line: int | None = field(default=None, compare=False)

    def texts(self) -> list[str]:
        """The example's texts (what decontamination looks for)."""
        return [self.text_a] if self.text_b is None else [self.text_a, self.text_b]


NLI = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, GlueTask] = {task.name: task for task in (
    GlueTask("cola", ("sentence",), headerless=("source", "label", "original_label", "sentence")),
    GlueTask("sst2", ("sentence", "text")),
    GlueTask("mrpc", ("#1 string",), ("#2 string",), label=("quality",)),
    GlueTask("stsb", ("sentence1",), ("sentence2",), label=("score",), labels=(), score_range=(0.0, 5.0)),
    GlueTask("qqp", ("question1",), ("question2",), label=("is_duplicate",)),
    GlueTask("mnli", ("sentence1",), ("sentence2",), label=("gold_label",),
             labels=("entailment", "neutral", "contradiction")),
    GlueTask("qnli", ("question",), ("sentence",), labels=NLI),
    GlueTask("rte", ("sentence1",), ("sentence2",), labels=NLI),
    GlueTask("wnli", ("sentence1",), ("sentence2",)),
    GlueTask("ax", ("sentence1",), ("sentence2",), labels=("entailment", "neutral", "contradiction")),
)}
ID_COLUMNS = ("index", "id")
# nyu-mll/glue's Parquet columns (text a, text b) per task; its labels are class indices in `labels` order.
HF_TEXT_COLUMNS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"), "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
    "ax": ("premise", "hypothesis"),
}
log = logging.getLogger(__name__)


def glue_task(path: Path | str, task: str | None = None) -> GlueTask:
    """The task named, or the one the file's folder is named after (`SST-2`, `sst2`, `STS-B`, `CoLA`, ...)."""
    name = task if task is not None else Path(path).parent.name
    key = name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        where = f"task {task!r}" if task is not None else f"its folder name {name!r}"
        raise DatasetError(f"{path}: {where} is not a GLUE task (one of {', '.join(GLUE_TASKS)}); "
                           "put the file in a folder named after its task or name the task")
    return GLUE_TASKS[key]


def read_glue(path: Path | str, task: str | None = None, on_bad: OnBad = None) -> list[GlueExample]:
    """Every example of a GLUE TSV file; see `iter_glue`."""
    return list(iter_glue(path, task, on_bad))


def iter_glue(path: Path | str, task: str | None = None, on_bad: OnBad = None) -> Iterator[GlueExample]:
    """Streams a GLUE TSV as examples; a malformed row raises DatasetError naming the file and line,
    or, given `on_bad`, is handed to it (reason wrong_column_count or unknown_label) and skipped."""
    path = Path(path)
    spec = glue_task(path, task)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    if path.suffix == ".parquet":
        yield from _parquet_examples(path, spec, on_bad)
        return
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            yield from _examples(path, spec, csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), on_bad)
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 ({err})") from None


def _examples(path: Path, spec: GlueTask, rows: Iterator[list[str]], on_bad: OnBad = None) -> Iterator[GlueExample]:
    first = next(rows, None)
    if first is None:
        raise DatasetError(f"{path}: empty file (expected a GLUE {spec.name} TSV)")
    columns = _layout(path, spec, [name.strip().lower() for name in first])
    data = _numbered(first, rows) if columns.headerless else ((rows.line_num, row) for row in rows)
    number = 0
    for line, row in data:
        if row:   # a blank line is not an example
            try:
                example = _example(path, line, spec, columns, row, number)
            except DatasetError as err:
                if on_bad is None:
                    raise
                reason = "wrong_column_count" if len(row) != columns.width else "unknown_label"
                on_bad(BadRow(str(path), line, reason, str(err)))
            else:
                yield example
            number += 1


def _numbered(first: list[str], rows: Iterator[list[str]]) -> Iterator[tuple[int, list[str]]]:
    """(line, row) of a headerless file: its first line is data, read like every other row."""
    yield 1, first
    for row in rows:
        yield rows.line_num, row


@dataclass(frozen=True)
class _Columns:
    """Where a file's fields are: indices into a row (None when the file has no such column)."""

    width: int
    text_a: int
    text_b: int | None
    label: int | None
    id: int | None
    headerless: bool


def _layout(path: Path, spec: GlueTask, header: list[str]) -> _Columns:
    """The column indices, from the header, or the task's fixed layout when the first row is data."""
    headerless = not any(name in header for name in spec.text_a) and bool(spec.headerless)
    names = list(spec.headerless) if headerless else header
    text_a = _index(names, spec.text_a)
    if text_a is None:
        raise DatasetError(f"{path}:1: no {spec.name} text column in header {header} "
                           f"(expected one of {list(spec.text_a)})")
    if not headerless and names[text_a] != spec.text_a[0]:
        log.warning("%s: header column %r read as GLUE's %r (a renamed header)", path, names[text_a], spec.text_a[0])
    text_b = _index(names, spec.text_b)
    if spec.text_b and text_b is None:
        raise DatasetError(f"{path}:1: no second text column in header {header} (expected one of {list(spec.text_b)})")
    return _Columns(len(names), text_a, text_b, _index(names, spec.label), _index(names, ID_COLUMNS), headerless)


def _index(names: list[str], wanted: tuple[str, ...]) -> int | None:
    return next((names.index(name) for name in wanted if name in names), None)


def _example(path: Path, line: int, spec: GlueTask, columns: _Columns, row: list[str], number: int) -> GlueExample:
    if len(row) != columns.width:
        raise DatasetError(f"{path}:{line}: expected {columns.width} tab-separated fields, found {len(row)}")
    label = None if columns.label is None else _label(path, line, spec, row[columns.label])
    return GlueExample(id=row[columns.id] if columns.id is not None else str(number), text_a=row[columns.text_a],
                       text_b=None if columns.text_b is None else row[columns.text_b], label=label, line=line)


def _label(path: Path, line: int, spec: GlueTask, value: str) -> Label:
    """The label as its task types it: a score in range, a 0/1 int, or a class name."""
    value = value.strip()
    if spec.score_range is not None:
        low, high = spec.score_range
        try:
            score = float(value)
        except ValueError:
            score = float("nan")
        if not low <= score <= high:
            raise DatasetError(f"{path}:{line}: {spec.name} score {value!r} is not a number in [{low:g}, {high:g}]")
        return score
    if value not in spec.labels:
        raise DatasetError(f"{path}:{line}: {spec.name} label {value!r} is not one of {list(spec.labels)}")
    return int(value) if value.isdigit() else value


def _parquet_examples(path: Path, spec: GlueTask, on_bad: OnBad) -> Iterator[GlueExample]:
    """Examples of a `nyu-mll/glue` Parquet file (row numbers stand in for line numbers in errors)."""
    import pyarrow.parquet as pq

    columns = HF_TEXT_COLUMNS.get(spec.name)
    table = pq.read_table(path)
    wanted = [c for c in (*(columns or ()), "label") if c]
    missing = [c for c in wanted if c not in table.column_names]
    if columns is None or missing:
        raise DatasetError(f"{path}: not nyu-mll/glue's {spec.name} layout (missing columns {missing}; "
                           f"has {table.column_names})")
    ids = table["idx"].to_pylist() if "idx" in table.column_names else range(table.num_rows)
    for row, (idx, record) in enumerate(zip(ids, table.select(wanted).to_pylist()), start=1):
        try:
            yield GlueExample(str(idx), record[columns[0]], record[columns[1]] if columns[1] else None,
                              _hf_label(path, row, spec, record["label"]), row)
        except DatasetError as err:
            if on_bad is None:
                raise
            on_bad(BadRow(str(path), row, "unknown_label", str(err)))


def _hf_label(path: Path, row: int, spec: GlueTask, value: int | float | None) -> Label | None:
    """A Parquet label in the TSV files' terms: -1 (a test split) is no label, a class index its name."""
    if value is None or value == -1:
        return None
    if spec.is_regression:
        return _label(path, row, spec, str(value))
    if not isinstance(value, int) or not 0 <= value < len(spec.labels):
        raise DatasetError(f"{path}: row {row}: {spec.name} label {value!r} is not a class index "
                           f"0..{len(spec.labels) - 1}")
    name = spec.labels[value]
    return int(name) if name.isdigit() else name
