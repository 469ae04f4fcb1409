"""What `lmforge run` shows: one live line per stage, then where to look; everything else goes to log files.

While a stage runs, this process's stdout and stderr (and so every library's and worker's output)
go to `<workspace>/logs/<run id>/<stage>.log`; the terminal shows a spinner with the stage's
progress (from `storage.progress`), then one line: built or cached, wall time, headline numbers.
When a stage fails, the last lines of its log are printed. `-v` streams everything instead.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from storage import progress

TAIL_LINES = 25
_active: "Terminal | None" = None


def active() -> "Terminal | None":
    """The terminal of this `lmforge` command, if the CLI opened one."""
    return _active


def activate(terminal: "Terminal | None") -> None:
    global _active
    _active = terminal


@dataclass
class StageLine:
    """The outcome the pipeline fills in while the stage runs."""

    name: str
    fingerprint: str
    cached: bool = False
    headline: dict[str, float] = field(default_factory=dict)


def format_number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}"


def headline_text(headline: dict[str, float]) -> str:
    return "  ".join(f"{name} {format_number(value)}" for name, value in headline.items())


def progress_text(report: dict[str, Any] | None, elapsed: float) -> str:
    """`1,200/5,000 step · 12.3 step/s` from a progress report, or the elapsed time alone."""
    if not report:
        return f"{elapsed:5.0f} s"
    done, total, unit = report["done"], report.get("total"), report.get("unit", "item")
    rate = done / elapsed if elapsed > 0 else 0.0
    amount = f"{format_number(done)}/{format_number(total)}" if total else format_number(done)
    return f"{elapsed:5.0f} s  {amount} {unit}  {rate:,.1f} {unit}/s"


class Terminal:
    """The CLI's view of a pipeline run. `verbose` streams every log line instead of hiding them."""

    def __init__(self, verbose: bool = False, stream: TextIO | None = None) -> None:
        from rich.console import Console

        self.verbose = verbose
        # our own copy of stdout: while a stage runs, descriptor 1 points at its log file
        stream = stream or os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        self.console = Console(file=stream, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def stage(self, name: str, fingerprint: str, scratch: Path, log_path: Path) -> Iterator[StageLine]:
        """Shows the stage while it runs (output captured to `log_path`), then its one-line summary."""
        line, started = StageLine(name, fingerprint), time.perf_counter()
        try:
            with self._captured(log_path), self._spinner(line, scratch, started):
                yield line
        except BaseException:
            self._failed(line, time.perf_counter() - started, log_path)
            raise
        self._finished(line, time.perf_counter() - started)

    @contextlib.contextmanager
    def _captured(self, log_path: Path) -> Iterator[None]:
        if self.verbose:
            yield
            return
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log, redirected_output(log.fileno()):
            yield

    @contextlib.contextmanager
    def _spinner(self, line: StageLine, scratch: Path, started: float) -> Iterator[None]:
        if self.verbose or not self.console.is_terminal:
            yield
            return
        with self.console.status(f"{line.name:<10} {line.fingerprint}") as status:
            stop = threading.Event()
            ticker = threading.Thread(target=self._tick, args=(status, line, scratch, started, stop), daemon=True)
            ticker.start()
            try:
                yield
            finally:
                stop.set()
                ticker.join()

    def _tick(self, status: Any, line: StageLine, scratch: Path, started: float, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            text = progress_text(progress.latest(scratch), time.perf_counter() - started)
            status.update(f"{line.name:<10} {line.fingerprint}  {text}")

    def _finished(self, line: StageLine, wall_s: float) -> None:
        state = "[dim]cached[/dim]" if line.cached else "[green]built[/green] "
        self.console.print(f"{line.name:<10} {line.fingerprint}  {state} {wall_s:7.1f} s  "
                           f"{headline_text(line.headline)}")

    def _failed(self, line: StageLine, wall_s: float, log_path: Path) -> None:
        self.console.print(f"{line.name:<10} {line.fingerprint}  [red]failed[/red] {wall_s:7.1f} s")
        if self.verbose or not log_path.is_file():
            return
        tail = log_path.read_text(errors="replace").splitlines()[-TAIL_LINES:]
        self.console.print(f"[dim]last lines of {log_path}:[/dim]")
        for text in tail:
            self.console.out(f"  {text}", highlight=False)

    def note(self, text: str) -> None:
        self.console.print(text)


@contextlib.contextmanager
def redirected_output(fd: int) -> Iterator[None]:
    """Points this process's stdout and stderr at `fd`, then back.

    At the descriptor level (1 and 2), so subprocesses (torchrun, datatrove workers) and C libraries
    write there too, and at the Python level (`sys.stdout`, `sys.stderr`) for writers that hold their
    own stream. The terminal keeps its own copy of the original stdout.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds, saved_streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    stream = os.fdopen(os.dup(fd), "w", buffering=1, errors="replace")
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = stream
        yield
    finally:
        stream.flush()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for copy in saved_fds:
            os.close(copy)
        stream.close()
