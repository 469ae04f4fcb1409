"""CoNLL-2003 named-entity files: `token POS chunk tag` per line, a blank line between sentences.

`-DOCSTART-` lines mark documents and are not sentences. Tags are IOB1 (the original release: a
chunk starts with `I-` unless it follows a chunk of the same type) or IOB2 (every chunk starts with
`B-`); `tag_scheme` tells which a file uses, and the scorer (`tasks.finetune.conlleval`) reads both.
A line with the wrong number of columns or a tag that is not `O`, `B-X` or `I-X` costs its sentence,
reported through `on_bad` (or raised without it): a sentence missing a token would be mislabelled.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.datasets.badrows import OnBad, report
from tasks.datasets.base import DatasetError

COLUMNS = 4
TAG = re.compile(r"^(O|[BI]-\S+)$")
DOCSTART = "-DOCSTART-"


@dataclass(frozen=True)
class TaggedSentence:
    """One sentence: `id` is its 0-based number in the file; `line` the line of its first token."""

    id: str
    line: int
    tokens: tuple[str, ...]
    tags: tuple[str, ...]


def read_conll(path: Path | str, on_bad: OnBad = None) -> list[TaggedSentence]:
    """Every good sentence of a CoNLL-2003 file, in file order."""
    return list(iter_conll(path, on_bad))


def iter_conll(path: Path | str, on_bad: OnBad = None) -> Iterator[TaggedSentence]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    number, block = 0, []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if fields and fields[0] != DOCSTART:
                block.append((line_no, fields))
                continue
            if block:
                sentence = _sentence(path, number, block, on_bad)
                number += 1
                if sentence is not None:
                    yield sentence
            block = []
    if block:
        sentence = _sentence(path, number, block, on_bad)
        if sentence is not None:
            yield sentence


def _sentence(path: Path, number: int, block: list[tuple[int, list[str]]], on_bad: OnBad) -> TaggedSentence | None:
    """The sentence of `block`, or None after reporting its first bad line."""
    for line_no, fields in block:
        if len(fields) != COLUMNS:
            report(on_bad, path, line_no, "wrong_column_count",
                   f"expected {COLUMNS} space-separated columns (token POS chunk tag), found {len(fields)}; "
                   f"sentence {number} skipped")
            return None
        if not TAG.match(fields[-1]):
            report(on_bad, path, line_no, "bad_tag", f"tag {fields[-1]!r} is not O, B-TYPE or I-TYPE; "
                   f"sentence {number} skipped")
            return None
    return TaggedSentence(str(number), block[0][0], tuple(fields[0] for _, fields in block),
                          tuple(fields[-1] for _, fields in block))


def tag_scheme(sentences: list[TaggedSentence]) -> str:
    """'IOB2' when every chunk starts with B-, else 'IOB1' (a chunk opened by I-)."""
    for sentence in sentences:
        previous = "O"
        for tag in sentence.tags:
            if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
                return "IOB1"
            previous = tag
    return "IOB2"


def tag_labels(sentences: list[TaggedSentence]) -> list[str]:
    """The tags in use, `O` first, then by entity type and B before I: a stable label order."""
    tags = {tag for sentence in sentences for tag in sentence.tags}
    return sorted(tags, key=lambda t: (t != "O", t[2:], t[:1]))
