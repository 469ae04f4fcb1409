"""The terminal: a stage's output (subprocesses too) goes to its log; one line per stage; a failure shows the tail."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from flows.terminal import Terminal, progress_text, redirected_output


def test_everything_a_stage_prints_lands_in_its_log_not_on_the_terminal(tmp_path: Path, capfd) -> None:
    screen = io.StringIO()
    view = Terminal(stream=screen)
    log = tmp_path / "logs" / "run" / "curate.log"
    with view.stage("curate", "abc123", tmp_path / "scratch", log) as line:
        print("rank 0 stats: 1,234 documents")
        subprocess.run([sys.executable, "-c", "import sys; print('worker says hi'); print('oops', file=sys.stderr)"])
        line.headline = {"docs_in": 26227.0, "docs_out": 2387.0}
    captured = capfd.readouterr()
    assert "rank 0" not in captured.out + captured.err and "worker says hi" not in captured.out
    assert log.read_text().splitlines() == ["rank 0 stats: 1,234 documents", "worker says hi", "oops"]
    assert screen.getvalue().split() == ["curate", "abc123", "built", *screen.getvalue().split()[3:5],
                                         "docs_in", "26,227", "docs_out", "2,387"]


def test_a_failed_stage_prints_the_tail_of_its_log(tmp_path: Path) -> None:
    screen = io.StringIO()
    log = tmp_path / "tokenizer.log"
    with pytest.raises(RuntimeError):
        with Terminal(stream=screen).stage("tokenizer", "fff000", tmp_path, log):
            for i in range(40):
                print(f"line {i}")
            raise RuntimeError("boom")
    shown = screen.getvalue()
    assert "tokenizer  fff000  failed" in shown and "line 39" in shown and "line 14" not in shown
    assert f"last lines of {log}" in shown


def test_verbose_streams_instead_of_capturing(tmp_path: Path, capsys) -> None:
    with Terminal(verbose=True, stream=io.StringIO()).stage("shard", "aaa", tmp_path, tmp_path / "shard.log"):
        print("visible")
    assert "visible" in capsys.readouterr().out and not (tmp_path / "shard.log").exists()


def test_redirection_is_undone(tmp_path: Path, capfd) -> None:
    with open(tmp_path / "x.log", "wb") as handle, redirected_output(handle.fileno()):
        print("hidden")
    print("shown")
    assert capfd.readouterr().out == "shown\n"


def test_progress_text() -> None:
    assert progress_text(None, 12.0).strip() == "12 s"
    text = progress_text({"done": 50, "total": 150, "unit": "step"}, 10.0)
    assert "50/150 step" in text and "5.0 step/s" in text
