"""A bad row of a dataset file: reported (file, line, reason) and skipped, or raised when nobody listens.

Loaders that can keep going past a bad row take `on_bad`: called with a `BadRow` for each row they
skip; without it the first bad row raises `DatasetError` naming the file and line. A stage passes a
callback that counts rows per reason, so nothing is lost silently and nothing is mislabelled.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.datasets.base import DatasetError


@dataclass(frozen=True)
class BadRow:
    path: str
    line: int | None          # 1-based line of the file (None: not a line-oriented format)
    reason: str               # a short counter name: wrong_column_count, unknown_label, empty_text, ...
    detail: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.detail}"


OnBad = Callable[[BadRow], None] | None


def report(on_bad: OnBad, path: Path | str, line: int | None, reason: str, detail: str) -> None:
    """Hands the bad row to `on_bad`, or raises DatasetError when there is no handler."""
    row = BadRow(str(path), line, reason, detail)
    if on_bad is None:
        raise DatasetError(str(row))
    on_bad(row)
