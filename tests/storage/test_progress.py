"""Progress reports: atomic, throttled, and the newest one found under a stage's scratch."""
from __future__ import annotations

import os
import time
from pathlib import Path

from storage import progress


def test_reports_are_throttled_unless_forced_and_the_newest_is_read(tmp_path: Path) -> None:
    run = tmp_path / "scratch" / "run"
    progress.report(run, 1, 10, "step")
    progress.report(run, 2, 10, "step")                       # within half a second: skipped
    assert progress.latest(tmp_path / "scratch") == {**progress.latest(tmp_path / "scratch"), "done": 1}
    progress.report(run, 10, 10, "step", force=True)
    assert progress.latest(tmp_path / "scratch")["done"] == 10
    deeper = tmp_path / "scratch" / "sst2" / "run"
    progress.report(deeper, 3, None, "example", force=True)
    os.utime(deeper / progress.PROGRESS_FILE, (time.time() + 5, time.time() + 5))
    assert progress.latest(tmp_path / "scratch")["unit"] == "example"
    assert not list(run.glob(".*.tmp"))                       # written through a temporary name


def test_no_report_is_none(tmp_path: Path) -> None:
    assert progress.latest(tmp_path) is None
