"""What tests share besides fixtures: where the checkout and the real data are, and running the CLI.

Imported by name (`from cliutil import run_cli`), never through `conftest`: with a second
`conftest.py` in the tree (tests/kernels), which module `conftest` means depends on collection order.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()


def run_cli(args: list[str], cwd: Path = REPO_ROOT, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """`lmforge ARGS` in a fresh process, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
