"""The Triton kernels against their PyTorch references: time and peak memory, eager and torch.compile'd.

On a CUDA GPU, at GPT-2 124M shapes (8 x 1024 tokens, width 768, vocabulary 50,304), forward +
backward, the way the trainer runs them (fp32 weights, bf16 autocast):

    cross-entropy  kernels.fused_linear_cross_entropy   vs  F.cross_entropy(F.linear(h, wte))  (GPT's loss)
    layer norm     kernels.layer_norm (fp32 and bf16 x) vs  F.layer_norm           (no autocast)
    gpt2-124m      one training forward + backward with model.kernels on, against off

Each case reports the median step time (CUDA events, after warm-up), the peak memory allocated
above what its inputs hold, the largest difference from the eager reference (loss or output, and
gradients relative to their largest entry), and the ratios to the eager reference and to the
torch.compile'd reference in the same run.

On a CPU the Triton kernels do not run (the interpreter checks them; it is no speed), so the CPU run
measures what the chunking itself buys: peak RSS and time of the chunked cross-entropy (its PyTorch
fallback, the same chunk loop) against full logits. Layer norm has nothing to compare there.

    python benchmarks/kernels.py                     # CUDA if present, else the CPU comparison
    python benchmarks/kernels.py --cpu --tokens 8192 # the GPU shape on a CPU (about 8 GB, a minute)
    OUT=/tmp/out benchmarks/gpu_kernels.sh           # on a GPU machine: everything above, under 5 minutes
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This script's folder must not shadow any package it imports.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from benchmarks.memory import peak_rss_mb  # noqa: E402

TOKENS, WIDTH, VOCAB = 8 * 1024, 768, 50304
EOT = 50256
MODEL_PRESET = "gpt2-124m"
COMPILED_MODEL_S = 150           # about what compiling gpt2-124m twice and timing it takes


@dataclass
class Result:
    case: str
    impl: str
    ms: float | None = None
    peak_mb: float | None = None
    max_diff: float | None = None           # against the eager reference: output, then gradients (relative)
    error: str | None = None


@dataclass
class Case:
    """One kernel problem: implementations by name, the leaves that get gradients, the upstream gradient."""

    name: str
    impls: dict[str, Callable[[], torch.Tensor]]
    leaves: list[torch.Tensor]
    upstream: torch.Tensor | None = None    # None: the output is a scalar loss
    leaves_by_impl: dict[str, list[torch.Tensor]] = field(default_factory=dict)   # where not `leaves`
    autocast: bool = True                   # bf16 autocast, as the trainer runs (off: the inputs' own dtype)

    def leaves_of(self, impl: str) -> list[torch.Tensor]:
        return self.leaves_by_impl.get(impl, self.leaves)


# ---- timing and memory on CUDA ----------------------------------------------------------------


def train_step(case: Case, impl: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward + backward of one implementation; its output and the leaves' gradients."""
    for leaf in case.leaves_of(impl):
        leaf.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=case.autocast):
        out = case.impls[impl]()
    out.backward(case.upstream)
    return out.detach(), [leaf.grad for leaf in case.leaves_of(impl)]


def time_cuda(case: Case, impl: str, warmup: int, repeats: int) -> tuple[float, float]:
    """(median ms per forward + backward, peak MB allocated above the inputs)."""
    for _ in range(warmup):
        train_step(case, impl)
    for leaf in case.leaves_of(impl):
        leaf.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step(case, impl)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        train_step(case, impl)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), peak


def difference(case: Case, impl: str, reference: tuple[torch.Tensor, list[torch.Tensor]]) -> float:
    """Largest |output - reference| and |grad - reference grad| / max |reference grad|."""
    out, grads = train_step(case, impl)
    diffs = [(out.float() - reference[0].float()).abs().max().item()]
    for got, want in zip(grads, reference[1]):
        diffs.append(((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-12)).item())
    return max(diffs)


def run_case(case: Case, warmup: int, repeats: int, report: Callable[[Result], None]) -> None:
    """Every implementation of `case`, each failure reported and the run going on; then the case's ratios
    (printed as soon as they are known: a run cut off by its time limit keeps those of the cases done)."""
    reference = train_step(case, "reference")
    results = []
    for impl in case.impls:
        result = Result(case.name, impl)
        try:
            result.ms, result.peak_mb = time_cuda(case, impl, warmup, repeats)
            result.max_diff = difference(case, impl, reference)
        except Exception as exc:          # a kernel that fails to compile must not hide the other numbers
            result.error = failure(exc)
        report(result)
        results.append(result)
        torch.cuda.empty_cache()
    print("".join(f"    {line}\n" for line in ratios(results)), flush=True)


# ---- the cases ----------------------------------------------------------------------------------


def with_compiled(impls: dict[str, Callable[[], torch.Tensor]]) -> dict[str, Callable[[], torch.Tensor]]:
    """Each implementation, eager and torch.compile'd (compiled on first use, inside the warm-up)."""
    return {**impls, **{f"{name} compiled": torch.compile(fn) for name, fn in impls.items()}}


def cross_entropy_case(tokens: int, device: str) -> Case:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, WIDTH, generator=g).to(device).requires_grad_()
    wte = (torch.randn(VOCAB, WIDTH, generator=g) * 0.02).to(device).requires_grad_()
    targets = torch.randint(0, EOT, (tokens,), generator=g).to(device)

    def reference() -> torch.Tensor:           # GPT.forward's loss: bf16 logits under autocast, CE in fp32
        return F.cross_entropy(F.linear(hidden, wte), targets, ignore_index=-1)

    def fused() -> torch.Tensor:
        return kernels.fused_linear_cross_entropy(hidden, wte, targets, ignore_index=-1)

    return Case(f"cross-entropy {tokens}x{WIDTH} @ vocab {VOCAB}",
                with_compiled({"reference": reference, "kernel": fused}), [hidden, wte])


def layer_norm_case(tokens: int, dtype: torch.dtype, device: str) -> Case:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, WIDTH, generator=g).to(device, dtype).requires_grad_()
    weight, bias = (torch.randn(WIDTH, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    upstream = torch.randn(tokens, WIDTH, generator=g).to(device, dtype)
    impls = {"reference": lambda: F.layer_norm(x, (WIDTH,), weight, bias, 1e-5),
             "kernel": lambda: kernels.layer_norm(x, weight, bias, 1e-5)}
    # No autocast: it would run both in fp32 (layer_norm is on CUDA autocast's fp32 list); this measures `dtype`.
    return Case(f"layer norm {tokens}x{WIDTH} {str(dtype).removeprefix('torch.')}", with_compiled(impls),
                [x, weight, bias], upstream, autocast=False)


def gpt2_case(tokens: int, device: str, compile_model: bool) -> Case:
    """gpt2-124m (vocabulary 50,304), one training forward + backward with model.kernels off and on."""
    from tasks.models import GPT
    from tasks.pretrain.config import KernelsConfig, ModelConfig
    from tasks.pretrain.objectives import use_kernels

    spec = ModelConfig(preset=MODEL_PRESET).resolve(VOCAB, {"<|endoftext|>": EOT})
    torch.manual_seed(0)
    plain = GPT(spec).to(device)
    fused = use_kernels(GPT(spec).to(device), KernelsConfig(fused_ce=True, fused_norm=True))
    fused.load_state_dict(plain.state_dict())
    idx = torch.randint(0, EOT, (tokens // spec.seq_len, spec.seq_len), device=device)
    targets = torch.roll(idx, -1, 1)
    impls = {"reference": lambda: plain(idx, targets).loss, "kernel": lambda: fused(idx, targets).loss}
    if compile_model:
        compiled_plain, compiled_fused = torch.compile(plain), torch.compile(fused)
        impls.update({"reference compiled": lambda: compiled_plain(idx, targets).loss,
                      "kernel compiled": lambda: compiled_fused(idx, targets).loss})
    # the same parameters in the same order in both models (fuse_layer_norms keeps module order)
    fused_params = list(fused.parameters())
    return Case(f"{MODEL_PRESET} step, {tokens} tokens", impls, list(plain.parameters()),
                leaves_by_impl={"kernel": fused_params, "kernel compiled": fused_params})


# ---- reporting ----------------------------------------------------------------------------------


def ratios(results: list[Result]) -> list[str]:
    """kernel / reference lines for each case: time and peak memory, against eager and compiled references."""
    lines = []
    by_case: dict[str, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(r.case, {})[r.impl] = r
    for case, impls in by_case.items():
        for kernel in ("kernel", "kernel compiled"):
            for ref in ("reference", "reference compiled"):
                k, r = impls.get(kernel), impls.get(ref)
                if k and r and k.ms and r.ms:
                    lines.append(f"{case}: {kernel} / {ref}: time x{k.ms / r.ms:.2f}, "
                                 f"peak memory x{k.peak_mb / max(r.peak_mb, 1e-9):.2f}")
    return lines


def printer(results: list[Result], json_path: Path | None) -> Callable[[Result], None]:
    def report(result: Result) -> None:
        results.append(result)
        if result.error:
            print(f"{result.case:42s} {result.impl:20s} FAILED {result.error}", flush=True)
        else:
            print(f"{result.case:42s} {result.impl:20s} {result.ms:9.3f} ms {result.peak_mb:10.1f} MB peak"
                  f"   max diff {result.max_diff:.2e}", flush=True)
        if json_path is not None:           # written after every case: a timeout keeps what was measured
            json_path.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return report


# ---- the CPU comparison -------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Linux: reset VmHWM to the current RSS (clear_refs 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def cpu_step(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> tuple[float, float | None]:
    """(seconds, peak RSS MB above the start) of one forward + backward."""
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    can_measure = reset_peak_rss()
    base, start = current_rss_mb(), time.perf_counter()
    fn().backward()
    seconds = time.perf_counter() - start
    return seconds, (peak_rss_mb() - base) if can_measure else None


def cpu_comparison(tokens: int, repeats: int, json_path: Path | None) -> None:
    os.environ.pop("TRITON_INTERPRET", None)       # the interpreter would run the kernel, slowly: not a speed
    print(f"no CUDA device: Triton kernels do not run here, so their speed cannot be measured. Measured instead:\n"
          f"the chunked cross-entropy (the kernel's chunk loop, PyTorch per chunk: backend "
          f"{kernels.backend('cpu')!r}) against full logits, fp32, {tokens} x {WIDTH} @ vocab {VOCAB}, "
          f"{torch.get_num_threads()} threads\n", flush=True)
    case = cross_entropy_case(tokens, "cpu")
    impls = {"full logits (reference)": case.impls["reference"], "chunked": case.impls["kernel"]}
    rows = {}
    for name, fn in impls.items():
        runs = [cpu_step(fn, case.leaves) for _ in range(repeats)]
        seconds = statistics.median(r[0] for r in runs)
        peak = max((r[1] for r in runs if r[1] is not None), default=None)
        rows[name] = {"seconds": seconds, "peak_rss_mb": peak}
        print(f"{name:26s} {seconds * 1000:9.1f} ms   peak RSS {'n/a' if peak is None else f'{peak:8.1f} MB'}")
    full, chunked = rows["full logits (reference)"], rows["chunked"]
    if full["peak_rss_mb"] and chunked["peak_rss_mb"]:
        print(f"\nchunked / full logits: time x{chunked['seconds'] / full['seconds']:.2f}, "
              f"peak RSS x{chunked['peak_rss_mb'] / full['peak_rss_mb']:.2f}")
    print("layer norm: on a CPU the dispatcher runs F.layer_norm itself; nothing to compare.")
    if json_path is not None:
        json_path.write_text(json.dumps({"device": "cpu", "tokens": tokens, "cross_entropy": rows}, indent=2) + "\n")


# ---- main ---------------------------------------------------------------------------------------


def gpu_benchmark(tokens: int, warmup: int, repeats: int, compile_model: bool, json_path: Path | None,
                  budget_s: float | None, model: bool = True) -> None:
    started = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True          # as the trainer sets it
    print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}; kernels backend "
          f"{kernels.backend('cuda')!r}; bf16 autocast, forward + backward\n", flush=True)
    results: list[Result] = []
    report = printer(results, json_path)
    for name, make in ((f"cross-entropy {tokens}x{WIDTH}", lambda: cross_entropy_case(tokens, "cuda")),
                       (f"layer norm {tokens}x{WIDTH} float32", lambda: layer_norm_case(tokens, torch.float32, "cuda")),
                       (f"layer norm {tokens}x{WIDTH} bfloat16",
                        lambda: layer_norm_case(tokens, torch.bfloat16, "cuda"))):
        run_built_case(name, make, warmup, repeats, report)
    left = None if budget_s is None else budget_s - (time.perf_counter() - started)
    if not model:
        print(f"(the {MODEL_PRESET} steps are left out: --no-model)", flush=True)
    else:
        if compile_model and left is not None and left < COMPILED_MODEL_S:
            print(f"(the compiled {MODEL_PRESET} steps are skipped: {left:.0f} s of --budget left)", flush=True)
            compile_model = False
        run_built_case(f"{MODEL_PRESET} step, {tokens} tokens", lambda: gpt2_case(tokens, "cuda", compile_model),
                       warmup, repeats, report)
    print("all ratios:\n" + "\n".join(ratios(results)))


def run_built_case(name: str, make: Callable[[], Case], warmup: int, repeats: int,
                   report: Callable[[Result], None]) -> None:
    """`run_case` on the case `make` builds; a case that cannot be built (a missing package: the model step
    imports the pretrain stage, which needs pydantic) is reported as failed, and the other cases' ratios still print."""
    try:
        case = make()
    except Exception as exc:
        report(Result(name, "setup", error=failure(exc)))
        return
    run_case(case, warmup, repeats, report)


def failure(exc: Exception) -> str:
    """The exception in one line for the table; the whole traceback into the log."""
    traceback.print_exc()
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first_line}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU comparison even where CUDA is present")
    parser.add_argument("--tokens", type=int, default=None, help=f"rows (default {TOKENS} on CUDA, 2048 on CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 10 on CUDA, 1 on CPU)")
    parser.add_argument("--no-compile-model", action="store_true", help="skip the compiled gpt2-124m steps")
    parser.add_argument("--no-model", action="store_true",
                        help="skip the gpt2-124m steps (the kernels alone: no pydantic or pretrain code needed)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: the compiled gpt2-124m steps are left out when less than "
                             f"{COMPILED_MODEL_S} s of it remain before them")
    args = parser.parse_args(argv)
    if args.cpu or not torch.cuda.is_available():
        cpu_comparison(args.tokens or 2048, args.repeats or 1, args.json)
    else:
        gpu_benchmark(args.tokens or TOKENS, args.warmup, args.repeats or 10, not args.no_compile_model, args.json,
                      args.budget, model=not args.no_model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
