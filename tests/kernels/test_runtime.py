"""kernels.runtime: when the kernels run, importing without Triton, and Triton's helpers following the launch's mode."""
from __future__ import annotations

import subprocess
import sys

import pytest

from kernels import backend, why_not_triton
from kernels.runtime import language_in_mode

REPO_ROOT = __file__.rsplit("/tests/", 1)[0]


def python(code: str, **env: str) -> str:
    """stdout of `code` in a fresh interpreter at the repo root, with `env` added to a clean environment."""
    import os

    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**base, **env}, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_kernels_imports_neither_triton_nor_dynamo() -> None:
    """Every model imports `kernels`: it must stay cheap, and work where Triton is not installed."""
    out = python("import sys, kernels, tasks.models; print('triton' in sys.modules, 'torch._dynamo' in sys.modules)")
    assert out == "False False"


@pytest.mark.parametrize("value, expected", [("1", "triton-interpreter"), ("True", "triton-interpreter"),
                                             ("ON", "triton-interpreter"), ("0", "torch"), ("yes", "torch")])
def test_the_interpreter_switch_is_read_as_triton_reads_it(value: str, expected: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backend("cpu") == expected
    assert (why_not_triton("cpu") is None) == (expected != "torch")


def test_triton_helpers_follow_the_launch_mode_and_are_put_back() -> None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    imported = tl.sum                       # decorated for whatever mode was in force when Triton was imported
    for interpret, kind in ((True, InterpretedFunction), (False, JITFunction)):
        with language_in_mode(interpret):
            assert isinstance(tl.sum, kind) and isinstance(tl.standard.zeros, kind)
            first = tl.sum
        assert tl.sum is imported
        with language_in_mode(interpret):
            assert tl.sum is first          # one counterpart per helper, so the interpreter's `is` checks hold


def test_the_reverse_swap_for_a_process_that_imported_triton_interpreting() -> None:
    out = python("import os, triton.language as tl\n"
                 "from triton.runtime.jit import JITFunction\n"
                 "from kernels.runtime import language_in_mode\n"
                 "interpreted = tl.sum\n"
                 "with language_in_mode(False):\n"
                 "    print(isinstance(tl.sum, JITFunction), end=' ')\n"
                 "print(tl.sum is interpreted, isinstance(tl.sum, JITFunction))", TRITON_INTERPRET="1")
    assert out == "True True False"
