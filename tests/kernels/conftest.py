"""Kernel tests run the Triton kernels through Triton's interpreter on CPU tensors (`TRITON_INTERPRET=1`).

The variable is set per test (monkeypatch), never for the session: it does not leak into other
tests or into the processes they start. `kernels.runtime.Kernel` decorates each kernel for the
mode in force when it launches, so setting it here, after `triton` may have been imported, is enough.
Tests marked `gpu` run the compiled kernels on CUDA instead and skip without it.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def triton_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """'interpreter' for the CPU tests, 'cuda' for the tests marked gpu."""
    pytest.importorskip("triton", reason="the kernel tests need Triton: pip install -e '.[test]'")
    if request.node.get_closest_marker("gpu"):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        yield "cuda"
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield "interpreter"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is fastest, and two crawl when the other core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
