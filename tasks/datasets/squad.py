"""SQuAD v1.1 and v2.0 JSON, read into typed questions.

Two layouts: the official nested one (`data[] -> paragraphs[] -> qas[]`, answers as
`[{text, answer_start}]`, v2 adds `is_impossible`) and the flat one the HF `datasets` library writes
(`data[]` of `{id, question, context, answers: {text: [...], answer_start: [...]}}`, or a bare list).
A field of the wrong type or missing raises DatasetError naming the file and its JSON location.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.datasets.base import DatasetError


@dataclass(frozen=True)
class SquadAnswer:
    text: str
    start: int      # character offset of the answer in the context


@dataclass(frozen=True)
class SquadExample:
    """One question; `answers` is empty for an unanswerable (v2) question."""

    id: str
    title: str
    context: str
    question: str
    answers: tuple[SquadAnswer, ...]
    is_impossible: bool

    def texts(self) -> list[str]:
        """The example's texts (what decontamination looks for): context, question, answers."""
        return [self.context, self.question, *(answer.text for answer in self.answers)]


def read_squad(path: Path | str) -> list[SquadExample]:
    """Every question of a SQuAD file, in file order; ids must be unique (predictions are keyed by id)."""
    examples = list(iter_squad(path))
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            raise DatasetError(f"{path}: question id {example.id!r} appears more than once")
        seen.add(example.id)
    return examples


def iter_squad(path: Path | str) -> Iterator[SquadExample]:
    """Streams the questions of a SQuAD file (nested official format or flat rows)."""
    path = Path(path)
    for index, item in enumerate(_items(path)):
        where = f"data[{index}]"
        if isinstance(item, dict) and "paragraphs" in item:
            yield from _article(path, item, where)
        else:
            yield _flat(path, item, where)


def _items(path: Path) -> list[Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    items = data.get("data") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise DatasetError(f"{path}: expected SQuAD JSON: an object with a 'data' list, or a list of questions")
    return items


def _field(path: Path, obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """`obj[key]`, checked to be of `kind`; the error names the file and the JSON location."""
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: {where}: expected an object, found {type(obj).__name__}")
    if key not in obj:
        raise DatasetError(f"{path}: {where}: missing '{key}'")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DatasetError(f"{path}: {where}.{key}: expected {expected}, found {type(value).__name__}")
    return value


def _article(path: Path, article: dict, where: str) -> Iterator[SquadExample]:
    title = article.get("title") or ""
    for p, paragraph in enumerate(_field(path, article, "paragraphs", list, where)):
        at = f"{where}.paragraphs[{p}]"
        context = _field(path, paragraph, "context", str, at)
        for q, qa in enumerate(_field(path, paragraph, "qas", list, at)):
            yield _question(path, qa, f"{at}.qas[{q}]", title, context)


def _question(path: Path, qa: dict, where: str, title: str, context: str) -> SquadExample:
    answers = tuple(_answer(path, a, f"{where}.answers[{i}]") for i, a in
                    enumerate(_field(path, qa, "answers", list, where)))
    impossible = qa.get("is_impossible", not answers)
    return SquadExample(str(_field(path, qa, "id", (str, int), where)), title, context,
                        _field(path, qa, "question", str, where), answers, bool(impossible))


def _answer(path: Path, answer: dict, where: str) -> SquadAnswer:
    return SquadAnswer(_field(path, answer, "text", str, where), _field(path, answer, "answer_start", int, where))


def _flat(path: Path, row: Any, where: str) -> SquadExample:
    """One row of the flat layout: answers as parallel lists `{text: [...], answer_start: [...]}`."""
    answers = _field(path, row, "answers", dict, where)
    texts = _field(path, answers, "text", list, f"{where}.answers")
    starts = _field(path, answers, "answer_start", list, f"{where}.answers")
    if len(texts) != len(starts):
        raise DatasetError(f"{path}: {where}.answers: {len(texts)} texts but {len(starts)} answer_start values")
    parsed = tuple(_answer(path, {"text": t, "answer_start": s}, f"{where}.answers[{i}]")
                   for i, (t, s) in enumerate(zip(texts, starts)))
    return SquadExample(str(_field(path, row, "id", (str, int), where)), str(row.get("title") or ""),
                        _field(path, row, "context", str, where), _field(path, row, "question", str, where),
                        parsed, bool(row.get("is_impossible", not parsed)))
