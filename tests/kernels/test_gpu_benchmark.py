"""benchmarks/kernels.py's GPU path and benchmarks/gpu_kernels.sh, dry-run on a CPU.

The GPU run gets one short try on a bare machine, so everything but the GPU itself is checked here:
the benchmark's cases, table and ratios with the kernels interpreted (CUDA's timers and memory counters
faked, tiny shapes), and the script's choices with a stand-in `python3` that "sees" a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

import benchmarks.kernels as bench

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_kernels.sh"


class FakeEvent:
    def __init__(self, **_: object) -> None:
        self.at = 0.0

    def record(self) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.at - self.at) * 1000


@pytest.fixture
def cpu_as_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """gpu_benchmark on CPU tensors: CUDA's timers and memory counters faked, tiny shapes, no torch.compile."""
    for name, value in {"synchronize": lambda *a: None, "memory_allocated": lambda *a: 0,
                        "reset_peak_memory_stats": lambda *a: None, "max_memory_allocated": lambda *a: 2**20,
                        "get_device_name": lambda *a: "no GPU (dry run)", "empty_cache": lambda *a: None,
                        "Event": FakeEvent}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    for name, value in {"VOCAB": 301, "WIDTH": 24, "EOT": 256, "MODEL_PRESET": "gpt-nano",
                        "with_compiled": lambda impls: impls}.items():
        monkeypatch.setattr(bench, name, value)
    for name in ("cross_entropy_case", "layer_norm_case", "gpt2_case"):
        build = getattr(bench, name)
        monkeypatch.setattr(bench, name, lambda *args, build=build: build(*("cpu" if a == "cuda" else a for a in args)))


def test_the_gpu_benchmark_reports_every_case_and_its_ratios(cpu_as_cuda: None, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    bench.gpu_benchmark(64, warmup=0, repeats=1, compile_model=False, json_path=tmp_path / "r.json", budget_s=None)
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["error"] for r in results] == [None] * 8
    assert {(r["case"].split(" ")[0], r["impl"]) for r in results} == \
        {(case, impl) for case in ("cross-entropy", "layer", "gpt-nano") for impl in ("reference", "kernel")}
    assert max(r["max_diff"] for r in results) < 0.05          # bf16 layer norm: one rounding
    as_they_come, summary = capsys.readouterr().out.split("all ratios:")
    for part in (as_they_come, summary):      # each case's as soon as it is done: a timeout keeps them
        assert sum(": kernel / reference: time x" in line for line in part.splitlines()) == 4


def test_a_model_step_that_cannot_be_built_leaves_the_kernel_ratios(cpu_as_cuda: None,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """The GPU machine's Python has no pydantic, which the pretrain code (the model step) imports."""
    def no_pydantic(*args: object) -> None:
        raise ModuleNotFoundError("No module named 'pydantic'")

    monkeypatch.setattr(bench, "gpt2_case", no_pydantic)
    bench.gpu_benchmark(64, warmup=0, repeats=1, compile_model=True, json_path=None, budget_s=None)
    out = capsys.readouterr().out
    assert "gpt-nano step, 64 tokens" in out and "FAILED ModuleNotFoundError: No module named 'pydantic'" in out
    assert sum(": kernel / reference: time x" in line for line in out.split("all ratios:")[1].splitlines()) == 3
    bench.gpu_benchmark(64, warmup=0, repeats=1, compile_model=True, json_path=None, budget_s=None, model=False)
    out = capsys.readouterr().out
    assert "left out: --no-model" in out and "FAILED" not in out


STAND_IN = """#!/usr/bin/env bash
# python3 of a GPU machine, in miniature: its torch sees a GPU, it lacks the modules in $FAKE_MISSING;
# pytest and the benchmark only record how they were called.
echo "$*" >> "$CALLS"
case "$1" in
    -c) case "$2" in *"import pytest"*) [ -n "${FAKE_PYTEST:-}" ]; exit;; *) exit 0;; esac;;
    -) shift; cat > /dev/null; lacks=()
       for m in "$@"; do case " $FAKE_MISSING " in *" $m "*) lacks+=("$m");; esac; done
       echo "${lacks[*]}"; exit 0;;
    -m) exit 0;;
    benchmarks/kernels.py) echo "ratios: kernel / reference"; exit 0;;
esac
exit 3
"""


def run_script(tmp_path: Path, missing: str, pytest_there: bool = False) -> tuple[subprocess.CompletedProcess, str]:
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(STAND_IN)
    (bin_dir / "python3").chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "CALLS": str(calls),
           "FAKE_MISSING": missing, "FAKE_PYTEST": "1" if pytest_there else ""}
    env.pop("LMFORGE_WHEELS", None)
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    return done, calls.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the repo's own Python would be the one that sees the GPU")
def test_the_gpu_script_measures_the_kernels_when_the_model_step_cannot_run(tmp_path: Path) -> None:
    done, calls = run_script(tmp_path, missing="pydantic")
    assert done.returncode == 0, done.stderr
    assert "lacks pydantic, which the gpt2-124m step needs" in done.stderr
    bench_call = [c for c in calls.splitlines() if c.startswith("benchmarks/kernels.py")]
    assert bench_call == [f"benchmarks/kernels.py --budget 220 --json {tmp_path}/out/kernels_gpu.json --no-model"]
    assert "ratios" in (tmp_path / "out" / "kernels_gpu.log").read_text()
    assert "no pytest" in (tmp_path / "out" / "kernels_gpu_tests.log").read_text()

    done, calls = run_script(tmp_path, missing="", pytest_there=True)
    assert done.returncode == 0, done.stderr
    assert "-m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_cross_entropy.py" in calls
    assert f"benchmarks/kernels.py --budget 220 --json {tmp_path}/out/kernels_gpu.json\n" in calls

    done, _ = run_script(tmp_path, missing="triton pydantic")
    assert done.returncode == 1 and "lacks triton, which the kernels need" in done.stderr
