"""The finance tasks: Financial PhraseBank sentiment and FOMC hawkish/dovish stance.

- Financial PhraseBank v1.0 (Malo et al. 2014): latin-1 text, one `sentence@label` per line,
  labels positive/negative/neutral. The release has one line without `@` (a stray `1` in
  `Sentences_AllAgree.txt`): reported and skipped, never fatal.
- FOMC (Shah et al. 2023, "Trillion Dollar Words"): CSV `index,sentence,year,label` with label
  0 dovish, 1 hawkish, 2 neutral; `group` is the year, for the sentiment index per year. The `index`
  column repeats within a file (it numbers rows of the sources it was combined from), so an
  example's `id` is its line number.

Bad rows (no separator, an unknown label, an empty sentence, a wrong column count) go to `on_bad`
with the file and line, or raise `DatasetError` without it.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.datasets.badrows import OnBad, report
from tasks.datasets.base import DatasetError

PHRASEBANK_LABELS = ("negative", "neutral", "positive")
FOMC_LABELS = ("dovish", "hawkish", "neutral")        # the files' 0, 1, 2
FOMC_COLUMNS = ("index", "sentence", "year", "label")


@dataclass(frozen=True)
class LabeledText:
    """One labelled text; `group` is what results are also broken down by (FOMC: the year)."""

    id: str
    text: str
    label: str
    group: str | None = None


def _open_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    with open(path, encoding=encoding, newline="") as handle:
        for number, line in enumerate(handle, start=1):
            yield number, line.rstrip("\r\n")


def read_phrasebank(path: Path | str, on_bad: OnBad = None) -> list[LabeledText]:
    """Every labelled sentence of a Financial PhraseBank file; `id` is its line number."""
    path, examples = Path(path), []
    for number, line in _open_lines(path, "latin-1"):
        if not line.strip():
            continue
        text, sep, label = line.rpartition("@")
        if not sep:
            report(on_bad, path, number, "no_label_separator", f"no '@' between sentence and label in {line[:60]!r}")
        elif label.strip() not in PHRASEBANK_LABELS:
            report(on_bad, path, number, "unknown_label", f"label {label!r} is not one of {list(PHRASEBANK_LABELS)}")
        elif not text.strip():
            report(on_bad, path, number, "empty_text", "the sentence is empty")
        else:
            examples.append(LabeledText(str(number), text.strip(), label.strip()))
    return examples


def read_fomc(path: Path | str, on_bad: OnBad = None) -> list[LabeledText]:
    """Every labelled sentence of an FOMC CSV; `id` is its line number, `group` its year."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = csv.reader(handle)
        header = [name.strip().lower() for name in next(rows, [])]
        if header != list(FOMC_COLUMNS):
            raise DatasetError(f"{path}:1: expected the header {','.join(FOMC_COLUMNS)}, found {','.join(header)}")
        return [example for row in rows if (example := _fomc_row(path, rows.line_num, row, on_bad))]


def _fomc_row(path: Path, line: int, row: list[str], on_bad: OnBad) -> LabeledText | None:
    if not row:
        return None
    if len(row) != len(FOMC_COLUMNS):
        report(on_bad, path, line, "wrong_column_count", f"expected {len(FOMC_COLUMNS)} columns, found {len(row)}")
        return None
    _, sentence, year, label = (value.strip() for value in row)
    if label not in ("0", "1", "2"):
        report(on_bad, path, line, "unknown_label", f"label {label!r} is not 0 (dovish), 1 (hawkish) or 2 (neutral)")
    elif not sentence:
        report(on_bad, path, line, "empty_text", "the sentence is empty")
    elif not year.isdigit():
        report(on_bad, path, line, "bad_year", f"year {year!r} is not a year")
    else:
        return LabeledText(str(line), sentence, FOMC_LABELS[int(label)], year)
    return None
