"""Progress a running stage reports, for the terminal: `progress.json` in its scratch directory.

A stage (or one of its worker processes) calls `report(dir, done, total, unit)` now and then, with
`dir` its `ctx.scratch` or a folder at most two levels below it (the training loop reports into its
run directory); the terminal reads the newest such file. The
write is atomic and throttled, so reporting every item costs nothing measurable.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PROGRESS_FILE = "progress.json"
MIN_INTERVAL_S = 0.5
_last_write: dict[Path, float] = {}


def report(directory: Path | str, done: float, total: float | None = None, unit: str = "item",
           force: bool = False) -> None:
    """Records `done` of `total` (None: unknown) `unit`s; at most one write per half second unless `force`."""
    path = Path(directory) / PROGRESS_FILE
    now = time.monotonic()
    if not force and now - _last_write.get(path, -MIN_INTERVAL_S) < MIN_INTERVAL_S:
        return
    _last_write[path] = now
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{PROGRESS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"done": done, "total": total, "unit": unit, "time": time.time()}))
    os.replace(tmp, path)


def counting(items: Iterable[T], directory: Path | str, unit: str, total: float | None = None,
             size: Callable[[T], float] = lambda item: 1) -> Iterator[T]:
    """Yields `items` unchanged, reporting how many `unit`s (`size` of each item) have passed."""
    done: float = 0
    for item in items:
        yield item
        done += size(item)
        report(directory, done, total, unit)
    report(directory, done, total, unit, force=True)


def latest(scratch: Path | str) -> dict[str, Any] | None:
    """The newest progress report in `scratch` or a folder at most two levels below it, if any."""
    scratch = Path(scratch)
    candidates = (scratch / PROGRESS_FILE, *scratch.glob(f"*/{PROGRESS_FILE}"), *scratch.glob(f"*/*/{PROGRESS_FILE}"))
    found = [p for p in candidates if p.is_file()]
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue          # replaced while we read it: the next poll gets the new one
    return None
