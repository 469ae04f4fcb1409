#!/usr/bin/env bash
# The Triton kernels on one CUDA GPU, against their PyTorch references (benchmarks/kernels.py):
# fused linear cross-entropy and LayerNorm at GPT-2 124M shapes (8 x 1024 tokens, width 768,
# vocabulary 50,304), and one gpt2-124m training step with model.kernels on against off; eager and
# torch.compile'd, bf16 autocast. Prints each case's time, peak memory and largest difference from
# the reference, then the kernel/reference ratios. First, when pytest is at hand, the CUDA tests of
# tests/kernels (the compiled kernels against the references in fp32 and bf16). Writes it all under
# $OUT. Takes 2-4 minutes (most of it torch.compile).
#
#   OUT=/tmp/out benchmarks/gpu_kernels.sh
#
# Installs nothing from a registry. It needs a Python whose torch sees the GPU (the repo's .venv if
# its torch does, else python3) with triton (PyPI's CUDA builds of torch bring it). The gpt2-124m step
# also needs what the pretrain code imports: pydantic and safetensors; without them it is left out
# (--no-model) and the kernels are measured all the same. If $LMFORGE_WHEELS names a folder of carried
# wheels for that Python (pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions),
# every wheel there is installed into a temporary folder first, with --no-deps: nothing is resolved.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET                      # the compiled kernels, not the interpreter

sees_gpu() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
PY=""
for candidate in .venv/bin/python python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && sees_gpu "$candidate"; then PY="$candidate"; break; fi
done
if [ -z "$PY" ]; then
    echo "gpu_kernels.sh: no Python here has a torch that sees a CUDA GPU" >&2
    exit 1
fi

lacking() {       # the modules among "$@" that $PY cannot import
    "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
if [ -n "${LMFORGE_WHEELS:-}" ] && [ -n "$(lacking triton pydantic safetensors)" ]; then
    deps=$(mktemp -d)
    if "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$deps" "$LMFORGE_WHEELS"/*.whl; then
        export PYTHONPATH="$PYTHONPATH:$deps"
    else
        echo "gpu_kernels.sh: the wheels in $LMFORGE_WHEELS did not install; going on without them" >&2
    fi
fi
missing=$(lacking triton)
if [ -n "$missing" ]; then
    echo "gpu_kernels.sh: $PY lacks $missing, which the kernels need; carry its wheel and set LMFORGE_WHEELS" >&2
    exit 1
fi
bench_args=()
missing=$(lacking pydantic safetensors)
if [ -n "$missing" ]; then
    echo "gpu_kernels.sh: $PY lacks $missing, which the gpt2-124m step needs (the pretrain code): it is left" \
        "out, the kernels are measured all the same; carry the wheels and set LMFORGE_WHEELS to measure it" >&2
    bench_args+=(--no-model)
fi

{
    "$PY" -c 'import sys, torch, triton; print("python:", sys.executable, sys.version.split()[0],
                                                "torch", torch.__version__, "triton", triton.__version__)'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
} | tee "$OUT/kernels_env.txt"

if "$PY" -c 'import pytest' 2>/dev/null; then
    # The kernel tests marked gpu: compiled kernels against the references. A failure is reported, and the
    # benchmark still runs (it prints each case's difference from the reference too).
    timeout 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_cross_entropy.py \
        tests/kernels/test_layer_norm.py 2>&1 | tee "$OUT/kernels_gpu_tests.log" || true
else
    echo "gpu_kernels.sh: no pytest for $PY: the CUDA kernel tests are skipped (the benchmark checks differences)" \
        | tee "$OUT/kernels_gpu_tests.log"
fi

timeout 235 "$PY" benchmarks/kernels.py --budget 220 --json "$OUT/kernels_gpu.json" ${bench_args[@]+"${bench_args[@]}"} \
    2>&1 | tee "$OUT/kernels_gpu.log"
