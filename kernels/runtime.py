"""When the Triton kernels run, and how: compiled on CUDA, or by Triton's interpreter on CPU tensors.

With `TRITON_INTERPRET=1` Triton runs a kernel's Python body on NumPy arrays instead of compiling
it: slow, but the very same kernel code, on CPU tensors. That is how the tests (and anyone without a
GPU) check the kernels. Triton reads that variable when a function is decorated, so `Kernel`
decorates lazily, once per mode, and Triton's own helpers follow the launch's mode too (see
`language_in_mode`): the variable can be set and unset at any time, e.g. per test. Nothing imports
`triton` until a kernel is about to run: `import kernels` works where Triton is not installed.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

# Kernel name -> launches in this process: the proof that a call ran Triton code, not the PyTorch fallback.
LAUNCHES: Counter[str] = Counter()


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None      # looked up, not imported


def interpreting() -> bool:
    """True when `TRITON_INTERPRET` is set now, read as Triton reads it (1, true or on, any case)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on")


def triton_runs_on(device: torch.device) -> bool:
    """Whether the kernels run for tensors on `device`: CUDA with Triton installed, or any device when interpreting."""
    return TRITON_INSTALLED and (interpreting() or device.type == "cuda")


def backend(device: torch.device | str) -> str:
    """What a dispatcher runs for tensors on `device`: 'triton', 'triton-interpreter' or 'torch' (the fallback)."""
    if not triton_runs_on(torch.device(device)):
        return "torch"
    return "triton-interpreter" if interpreting() else "triton"


def why_not_triton(device: torch.device | str) -> str | None:
    """Why the kernels fall back to PyTorch on `device` (None when they run)."""
    if not TRITON_INSTALLED:
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
        return functools.partial(self._launch, grid)

    def _launch(self, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
        import triton

        mode = interpreting()
        if mode not in self._jitted:
            self._jitted[mode] = triton.jit(self.fn)
        LAUNCHES[self.name] += 1
        with language_in_mode(mode):
            return self._jitted[mode][grid](*args, **kwargs)


# ---- triton.language's own helpers in the mode of the launch ------------------------------------------
#
# tl.sum, tl.max, tl.zeros... are themselves @triton.jit functions, decorated once when Triton is
# imported, for the mode in force then. A process that imported Triton before TRITON_INTERPRET was
# set (a test session, torch.compile) would fail inside an interpreted kernel ("Cannot call @triton.jit'd
# outside of the scope of a kernel"), and the reverse inside a compiled one. So for the duration of a
# launch they are swapped for their counterpart in the launch's mode, then put back: nothing else sees it.

LANGUAGE_MODULES = ("triton.language", "triton.language.standard", "triton.language.random")
_swaps: dict[bool, list[tuple[Any, str, Any, Any]]] = {}


@contextlib.contextmanager
def language_in_mode(interpret: bool) -> Iterator[None]:
    """triton.language's @jit helpers decorated for `interpret` inside the block (usually nothing to swap)."""
    if interpret not in _swaps:
        _swaps[interpret] = _find_swaps(interpret)
    swaps = _swaps[interpret]
    for module, name, _, replacement in swaps:
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name, original, _ in swaps:
            setattr(module, name, original)


def _find_swaps(interpret: bool) -> list[tuple[Any, str, Any, Any]]:
    """(module, name, the helper as imported, its counterpart) for every helper decorated for the other mode."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    counterparts: dict[int, Any] = {}      # one counterpart per helper, so `is` comparisons still hold
    swaps = []
    for module in map(importlib.import_module, LANGUAGE_MODULES):
        for name, value in list(vars(module).items()):
            if interpret and isinstance(value, JITFunction):
                made = counterparts.setdefault(id(value), InterpretedFunction(value.fn))
            elif not interpret and isinstance(value, InterpretedFunction):
                made = counterparts.setdefault(id(value), JITFunction(value.fn, **getattr(value, "kwargs", {})))
            else:
                continue
            swaps.append((module, name, value, made))
    return swaps
