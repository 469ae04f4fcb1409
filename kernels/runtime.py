"""When the Triton kernels run, and how: compiled on CUDA, or by Triton's interpreter on CPU tensors.

With `TRITON_INTERPRET=1` Triton runs a kernel's Python body on NumPy arrays instead of compiling
it: slow, but the very same kernel code, on CPU tensors. That is how the tests (and anyone without a
GPU) check the kernels. Triton reads that variable when a function is decorated, so `Kernel`
decorates lazily, once per mode, and nothing imports `triton` until a kernel is about to run:
`import kernels` works where Triton is not installed (it is an optional dependency).
"""
from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

# Kernel name -> launches in this process: the proof that a call ran Triton code, not the PyTorch fallback.
LAUNCHES: Counter[str] = Counter()


@torch.compiler.assume_constant_result
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@torch.compiler.assume_constant_result
def interpreting() -> bool:
    """True when `TRITON_INTERPRET` is set now (read as Triton reads it)."""
    if not triton_installed():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


def triton_runs_on(device: torch.device) -> bool:
    """Whether the kernels run for tensors on `device`: CUDA with Triton installed, or any device when interpreting."""
    return triton_installed() and (interpreting() or device.type == "cuda")


def backend(device: torch.device | str) -> str:
    """What a dispatcher runs for tensors on `device`: 'triton', 'triton-interpreter' or 'torch' (the fallback)."""
    if not triton_runs_on(torch.device(device)):
        return "torch"
    return "triton-interpreter" if interpreting() else "triton"


def why_not_triton(device: torch.device | str) -> str | None:
    """Why the kernels fall back to PyTorch on `device` (None when they run)."""
    if not triton_installed():
        return "Triton is not installed (pip install triton, or the project's [test]/[dev] extra)"
    if not triton_runs_on(torch.device(device)):
        return f"Triton kernels need a CUDA device (this is {torch.device(device).type}), or TRITON_INTERPRET=1"
    return None


class Kernel:
    """A Triton kernel, `@triton.jit`-decorated on first launch for the current mode (compiled or interpreted).

    `Kernel(fn)[grid](*args)` launches like a `triton.jit` function. Each launch is counted in `LAUNCHES`.
    """

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn, self.name = fn, fn.__name__
        self._jitted: dict[bool, Any] = {}

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        import triton

        mode = interpreting()
        if mode not in self._jitted:
            self._jitted[mode] = triton.jit(self.fn)
        LAUNCHES[self.name] += 1
        return self._jitted[mode][grid]
