"""Multiple-choice and cloze evaluation sets in their released layouts, rendered as lm-evaluation-harness renders them.

Each reader turns one file into `ChoiceItem`s: the (context, continuation) pairs the harness scores
for an item, one per choice, and the index of the right one. The renderings follow the harness's
task YAMLs (`lm_eval/tasks/<task>/*.yaml`):

    arc         "Question: {stem}\\nAnswer:" + " {choice}"        (ARC-Easy / ARC-Challenge jsonl)
    piqa        "Question: {goal}\\nAnswer:" + " {sol}"           (valid.jsonl + valid-labels.lst)
    hellaswag   "{activity}: {ctx_a} {Ctx_b}" + " {ending}"       (hellaswag_val.jsonl, cleaned as the harness does)
    swag        "{startphrase}" + " {ending}"                     (val.csv, or JSON rows with sent1/sent2)
    winogrande  "{sentence up to _}{option}" + " {rest}"          (dev.jsonl [+ dev-labels.lst]): partial scoring
    lambada     "{text less its last word}" + " {last word}"      (lambada_test.jsonl): one continuation

A row that cannot be used (not JSON, a field missing or of the wrong type, an empty choice, a label
out of range) is skipped and reported as a `BadRow` with its file, line and reason; a file with no
usable row raises `DatasetError` naming the file. Plain Python: no torch.

The layouts are known here only: which fields hold each row's question or context and its choices
(`FORMATS[...].text`). The readers render those texts; dedup's decontamination reads them raw, labels
or not, through `iter_row_texts` (and `detect_format` when a file's layout is to be told by its fields).
"""
from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.datasets.base import DatasetError

TARGET_DELIMITER = " "        # the harness's default target_delimiter, between context and choice
BLANK = "_"                   # WinoGrande's blank, filled by each option


@dataclass(frozen=True)
class ChoiceItem:
    """One item: `contexts[i] + continuations[i]` is choice i as scored; `choices[i]` its text (acc_norm length)."""

    id: str
    line: int                           # 1-based line (CSV: record) of the item in its file
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: int
    choices: tuple[str, ...]

    @property
    def demonstration(self) -> str:
        """The item answered: what a k-shot prompt shows of it (the gold pair, joined)."""
        return self.contexts[self.label] + self.continuations[self.label]


@dataclass(frozen=True)
class BadRow:
    path: str
    line: int
    reason: str
    detail: str = ""


@dataclass
class TaskFile:
    """The usable items of a file, and the rows that were skipped (with why)."""

    path: Path
    items: list[ChoiceItem] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.items) + len(self.bad)


@dataclass(frozen=True)
class RowText:
    """A row's text as released, before any rendering: what a page quoting the item would contain."""

    format: str
    line: int                           # 1-based line (CSV: record) of the row in its file
    context: str                        # ARC stem, PIQA goal, HellaSwag ctx_a ctx_b, SWAG start phrase,
                                        # WinoGrande sentence (with its blank), LAMBADA passage
    choices: tuple[str, ...]            # as released; WinoGrande: the options; LAMBADA: none
    row: dict[str, Any] = field(repr=False, compare=False)   # the parsed row, for the readers' ids and labels

    def quotes(self) -> list[str]:
        """The context alone and followed by each choice (WinoGrande: the sentence with each option in its blank)."""
        if self.format == "winogrande":
            return [self.context.replace(BLANK, choice, 1) for choice in self.choices]
        return [self.context, *(f"{self.context} {choice}".strip() for choice in self.choices)]


class _Bad(Exception):
    """A row that cannot be used: `reason` is the counter's name, the message the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# ---- reading rows ---------------------------------------------------------------------------


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | _Bad]]:
    """(line number, parsed object or why not) for every non-blank line."""
    with _open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield number, _Bad("invalid_json", f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            yield number, row if isinstance(row, dict) else _Bad("not_an_object", f"a JSON {type(row).__name__}")


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | _Bad]]:
    csv.field_size_limit(sys.maxsize)
    with _open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            if None in row or None in row.values():
                yield reader.line_num, _Bad("wrong_field_count", f"{len(reader.fieldnames or [])} columns expected")
            else:
                yield reader.line_num, row


def _json_or_jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | _Bad]]:
    """A JSON array of rows (row numbers count from 1), else JSON lines."""
    with _open(path) as handle:
        head = handle.read(4096).lstrip()
    if not head.startswith("["):
        yield from _jsonl_rows(path)
        return
    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    for number, row in enumerate(rows, start=1):
        yield number, row if isinstance(row, dict) else _Bad("not_an_object", f"a JSON {type(row).__name__}")


def _open(path: Path, newline: str | None = None):
    """The file as text; a UTF-8 byte-order mark, if any, is not part of the first row."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    return open(path, encoding="utf-8-sig", newline=newline)


def _labels(path: Path) -> list[str]:
    """A labels file (`*.lst`): one label per line."""
    with _open(path) as handle:
        return [line.strip() for line in handle if line.strip()]


# ---- fields ---------------------------------------------------------------------------------


def _get(row: dict[str, Any], name: str) -> Any:
    if name not in row or row[name] is None:
        raise _Bad("missing_field", f"field {name!r} is missing")
    return row[name]


def _text(row: dict[str, Any], name: str, strict: bool = True) -> str:
    """A string field; `strict` (a row to score): not blank either."""
    value = _get(row, name)
    if not isinstance(value, str):
        raise _Bad("wrong_type", f"field {name!r} is a {type(value).__name__}, not a string")
    if strict and not value.strip():
        raise _Bad("empty_text", f"field {name!r} is empty")
    return value


def _choice_texts(values: list[Any], where: str, strict: bool = True) -> tuple[str, ...]:
    """Strings; `strict` (a row to score): at least two, none blank."""
    if strict and len(values) < 2:
        raise _Bad("too_few_choices", f"{where} has {len(values)} choice(s); at least 2 are needed")
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise _Bad("wrong_type", f"{where}[{index}] is a {type(value).__name__}, not a string")
        if strict and not value.strip():
            raise _Bad("empty_choice", f"{where}[{index}] is empty")
    return tuple(values)


def _index_label(value: Any, n_choices: int, where: str) -> int:
    """An integer label (or its digits as a string) in 0..n_choices-1."""
    text = str(value).strip()
    if isinstance(value, bool) or not re.fullmatch(r"-?\d+", text):
        raise _Bad("invalid_label", f"{where} {value!r} is not an integer")
    if not 0 <= int(text) < n_choices:
        raise _Bad("label_out_of_range", f"{where} {value!r} is not in 0..{n_choices - 1}")
    return int(text)


def _choice_item(item_id: str, line: int, context: str, choices: tuple[str, ...], label: int) -> ChoiceItem:
    """A multiple-choice item: one context, the choices as continuations after the target delimiter."""
    return ChoiceItem(item_id, line, (context,) * len(choices), tuple(TARGET_DELIMITER + c for c in choices),
                      label, choices)


# ---- the layouts: where each format keeps a row's text --------------------------------------
# Each returns a parsed row's (context, choices) as released, or raises _Bad. `strict` (a row the readers
# score) also refuses blank texts and fewer than two choices; decontamination reads every row with text.


def _arc_text(row: dict[str, Any], strict: bool) -> tuple[str, tuple[str, ...]]:
    question = _get(row, "question")
    if not isinstance(question, dict):
        raise _Bad("wrong_type", "field 'question' is not an object")
    stem = _text(question, "stem", strict)
    texts = [choice.get("text") for choice in _arc_choices(question)]
    return stem, _choice_texts(texts, "question.choices.text", strict)


def _arc_choices(question: dict[str, Any]) -> list[dict[str, Any]]:
    choices = _get(question, "choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise _Bad("wrong_type", "field 'question.choices' is not a list of objects")
    return choices


def _piqa_text(row: dict[str, Any], strict: bool) -> tuple[str, tuple[str, ...]]:
    return _text(row, "goal", strict), _choice_texts([_get(row, "sol1"), _get(row, "sol2")], "sol1/sol2", strict)


def _hellaswag_text(row: dict[str, Any], strict: bool) -> tuple[str, tuple[str, ...]]:
    """ctx_a and ctx_b (the released `ctx` is the two joined); the harness's prompt adds activity_label."""
    ctx_b = _get(row, "ctx_b")
    if not isinstance(ctx_b, str):
        raise _Bad("wrong_type", "field 'ctx_b' is not a string")
    if strict:
        _text(row, "activity_label")
    ctx_a = _text(row, "ctx_a", strict)
    endings = _get(row, "endings")
    if not isinstance(endings, list):
        raise _Bad("wrong_type", "field 'endings' is not a list")
    return " ".join(part for part in (ctx_a, ctx_b) if part), _choice_texts(endings, "endings", strict)


def _swag_text(row: dict[str, Any], strict: bool) -> tuple[str, tuple[str, ...]]:
    """The start phrase (val.csv), else sent1 and sent2 (the JSON rows); four endings."""
    start = row.get("startphrase")
    context = start if isinstance(start, str) and start.strip() else \
        f"{_text(row, 'sent1', strict)} {_text(row, 'sent2', strict)}"
    return context, _choice_texts([_get(row, f"ending{i}") for i in range(4)], "ending0..3", strict)


def _winogrande_text(row: dict[str, Any], strict: bool) -> tuple[str, tuple[str, ...]]:
    """The sentence with its blank, and the two options that fill it."""
    sentence = _text(row, "sentence", strict)
    if strict and BLANK not in sentence:
        raise _Bad("no_blank", "field 'sentence' has no '_' blank")
    return sentence, _choice_texts([_get(row, "option1"), _get(row, "option2")], "option1/option2", strict)


def _lambada_text(row: dict[str, Any], strict: bool) -> tuple[str, tuple[str, ...]]:
    return _text(row, "text", strict), ()


# ---- the readers: a row's text rendered as the harness renders it, and its label -------------


def _arc(text: RowText, path: Path, label: str | None) -> ChoiceItem:
    row = text.row
    keys = [str(choice.get("label")) for choice in _arc_choices(row["question"])]
    answer = str(_get(row, "answerKey")).strip()
    if answer not in keys:
        raise _Bad("label_out_of_range", f"answerKey {answer!r} is not one of the choice labels {keys}")
    return _choice_item(str(_get(row, "id")), text.line, f"Question: {text.context}\nAnswer:", text.choices,
                        keys.index(answer))


def _piqa(text: RowText, path: Path, label: str | None) -> ChoiceItem:
    answer = _index_label(label if label is not None else _get(text.row, "label"), 2, "label")
    return _choice_item(str(text.row.get("id", f"{path.stem}:{text.line}")), text.line,
                        f"Question: {text.context}\nAnswer:", text.choices, answer)


def hellaswag_clean(text: str) -> str:
    """The harness's `hellaswag/utils.py:preprocess`: WikiHow's bracketed artefacts removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(text: RowText, path: Path, label: str | None) -> ChoiceItem:
    row = text.row      # activity_label, ctx_a and ctx_b: checked by _hellaswag_text
    query = hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    texts = _choice_texts([hellaswag_clean(ending) for ending in text.choices], "endings")
    answer = _index_label(_get(row, "label"), len(texts), "label")
    return _choice_item(str(row.get("ind", f"{path.stem}:{text.line}")), text.line, query, texts, answer)


def _swag(text: RowText, path: Path, label: str | None) -> ChoiceItem:
    answer = _index_label(_get(text.row, "label"), 4, "label")
    return _choice_item(f"{path.stem}:{text.line}", text.line, text.context, text.choices, answer)


def _winogrande(text: RowText, path: Path, label: str | None) -> ChoiceItem:
    """Partial scoring: each option fills the blank in the context; the rest of the sentence is scored."""
    row = text.row
    answer = str(label if label is not None else _get(row, "answer")).strip()
    if label is not None and str(row.get("answer", "")).strip() not in ("", answer):
        raise _Bad("label_mismatch", f"answer {row['answer']!r} differs from the labels file's {label!r}")
    if answer not in ("1", "2"):
        raise _Bad("label_out_of_range", f"answer {answer!r} is not 1 or 2")
    blank = text.context.index(BLANK)
    contexts = tuple(text.context[:blank] + option for option in text.choices)
    suffix = TARGET_DELIMITER + text.context[blank + 1:].strip()
    return ChoiceItem(str(_get(row, "qID")), text.line, contexts, (suffix, suffix), int(answer) - 1, contexts)


def _lambada(text: RowText, path: Path, label: str | None) -> ChoiceItem:
    """The last space-separated word is the target, as `lambada_openai.yaml` splits on ' '."""
    words = text.context.split(" ")
    if len(words) < 2 or not words[-1]:
        raise _Bad("no_target", "field 'text' has no space-separated last word")
    target = " " + words[-1]
    return ChoiceItem(f"{path.stem}:{text.line}", text.line, (" ".join(words[:-1]),), (target,), 0, (target,))


RowReader = Callable[[Path], Iterator[tuple[int, "dict[str, Any] | _Bad"]]]
TextReader = Callable[[dict[str, Any], bool], tuple[str, tuple[str, ...]]]
Parser = Callable[[RowText, Path, "str | None"], ChoiceItem]


@dataclass(frozen=True)
class Format:
    """One released layout: its rows, where a row's text is, the reader's rendering, the fields that tell a
    file of this layout by its first row, and whether a labels file is used."""

    rows: RowReader
    text: TextReader
    parse: Parser
    fields: tuple[str, ...]
    labels_file: str = "no"          # "no" | "optional" | "required"


def _csv_or_json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | _Bad]]:
    """A `.csv` file's records, else a JSON array's rows or JSON lines."""
    return _csv_rows(path) if path.suffix.lower() == ".csv" else _json_or_jsonl_rows(path)


FORMATS: dict[str, Format] = {
    "arc": Format(_jsonl_rows, _arc_text, _arc, ("question", "answerKey")),
    "piqa": Format(_jsonl_rows, _piqa_text, _piqa, ("goal", "sol1", "sol2"), labels_file="required"),
    "hellaswag": Format(_jsonl_rows, _hellaswag_text, _hellaswag, ("ctx_a", "endings")),
    "swag": Format(_csv_or_json_rows, _swag_text, _swag, ("sent1", "sent2", "ending0")),
    "winogrande": Format(_jsonl_rows, _winogrande_text, _winogrande, ("sentence", "option1", "option2"),
                         labels_file="optional"),
    "lambada": Format(_jsonl_rows, _lambada_text, _lambada, ("text",)),
}


def _row_text(format: str, line: int, row: dict[str, Any] | _Bad, strict: bool) -> RowText:
    if isinstance(row, _Bad):
        raise row
    context, choices = FORMATS[format].text(row, strict)
    return RowText(format, line, context, choices, row)


def _spec(format: str, path: Path) -> Format:
    if format not in FORMATS:
        raise DatasetError(f"{path}: unknown format {format!r} (one of {', '.join(FORMATS)})")
    return FORMATS[format]


# ---- raw texts, for decontamination -----------------------------------------------------------


def iter_row_texts(format: str, path: Path | str) -> Iterator[RowText]:
    """Every row's text as released, in file order; no labels needed, blank texts and any number of choices
    kept. A row with no text to read (not JSON, a text field missing or not a string) raises DatasetError
    naming the file and line."""
    path = Path(path)
    spec = _spec(format, path)
    for line, row in spec.rows(path):
        try:
            text = _row_text(format, line, row, strict=False)
        except _Bad as bad:
            detail = str(bad) if bad.reason == "invalid_json" else f"not a {format} row ({bad})"
            raise DatasetError(f"{path}:{line}: {detail}") from None
        yield text


def detect_format(path: Path | str) -> str:
    """The format whose fields the first row of `path` (CSV, a JSON array or JSON lines) has; DatasetError
    naming the file, the line and what it found when no format fits."""
    path = Path(path)
    rows = _csv_or_json_rows(path)
    first = next(rows, None)
    rows.close()
    if first is None:
        raise DatasetError(f"{path}: no rows")
    line, row = first
    if isinstance(row, _Bad) and row.reason == "invalid_json":
        raise DatasetError(f"{path}:{line}: {row}")
    for name, spec in FORMATS.items():
        if isinstance(row, dict) and all(field_name in row for field_name in spec.fields):
            return name
    found = f"fields {', '.join(sorted(row))}" if isinstance(row, dict) else str(row)
    raise DatasetError(f"{path}:{line}: not a multiple-choice layout the evaluate stage reads (the fields of "
                       f"{', '.join(FORMATS)} expected; found {found})")


# ---- scored items, for the evaluate and finetune stages ----------------------------------------


def read_choice_file(format: str, path: Path | str, labels: Path | str | None = None) -> TaskFile:
    """Every usable item of `path` in layout `format` (a key of FORMATS), and the rows skipped."""
    spec, path = _spec(format, Path(path)), Path(path)
    if labels is not None and spec.labels_file == "no":
        raise DatasetError(f"{labels}: {format} files carry their labels; a labels file is not used")
    if labels is None and spec.labels_file == "required":
        raise DatasetError(f"{path}: {format} keeps its labels in a separate file: name it (e.g. valid-labels.lst)")
    result = TaskFile(path)
    rows = list(spec.rows(path))
    label_list = _aligned_labels(path, Path(labels), len(rows)) if labels is not None else [None] * len(rows)
    seen: set[str] = set()
    for (line, row), label in zip(rows, label_list):
        _add(result, format, line, row, label, seen)
    if not result.items:
        reasons = sorted({bad.reason for bad in result.bad})
        raise DatasetError(f"{path}: no usable {format} rows ({result.rows} rows read"
                           + (f"; skipped: {', '.join(reasons)}" if reasons else "") + ")")
    return result


def _aligned_labels(path: Path, labels: Path, n_rows: int) -> list[str]:
    values = _labels(labels)
    if len(values) != n_rows:
        raise DatasetError(f"{labels}: {len(values)} labels for the {n_rows} rows of {path}; "
                           "the files must be aligned line by line")
    return values


def _add(result: TaskFile, format: str, line: int, row: dict[str, Any] | _Bad, label: str | None,
         seen: set[str]) -> None:
    try:
        item = FORMATS[format].parse(_row_text(format, line, row, strict=True), result.path, label)
        if item.id in seen:
            raise _Bad("duplicate_id", f"id {item.id!r} appears earlier in the file")
    except _Bad as bad:
        result.bad.append(BadRow(str(result.path), line, bad.reason, str(bad)))
        return
    seen.add(item.id)
    result.items.append(item)
