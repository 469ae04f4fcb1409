#!/usr/bin/env bash
# Pretrain throughput on one CUDA GPU: gpt2-124m (12 layers, 768 wide, vocab 50257, block 1024),
# bf16 autocast, torch.compile, fused AdamW, flash SDPA, nanoGPT's 0.5M-token batch with the largest
# micro-batch that fits (probed), 5 warm-up + 20 timed steps of lmforge's trainer. Prints tokens/s
# and MFU (against the GPU's dense bf16 peak from tasks/training/runtime.py's table; "n/a" for a GPU
# the table does not know), then GPT.generate with and without the KV cache, and writes it all
# under $OUT. Takes 2-4 minutes.
#
#   OUT=/tmp/out benchmarks/gpu.sh
#
# Installs nothing from a registry. It needs a Python whose torch sees the GPU (the repo's .venv if
# its torch does, else python3) with numpy, pyarrow, pydantic, safetensors, psutil and tqdm. If
# one is missing and $LMFORGE_WHEELS names a folder of carried wheels for that Python, they are
# installed from there into a temporary folder, e.g. prepared on a connected machine with
#   pip download pydantic --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d wheels
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

sees_gpu() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
PY=""
for candidate in .venv/bin/python python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && sees_gpu "$candidate"; then PY="$candidate"; break; fi
done
if [ -z "$PY" ]; then
    echo "gpu.sh: no Python here has a torch that sees a CUDA GPU" >&2
    exit 1
fi

missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("numpy", "pyarrow", "pydantic", "safetensors", "psutil", "tqdm")
               if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    if [ -z "${LMFORGE_WHEELS:-}" ]; then
        echo "gpu.sh: $PY lacks: $missing; carry wheels for them and set LMFORGE_WHEELS" >&2
        exit 1
    fi
    deps=$(mktemp -d)
    "$PY" -m pip install --quiet --no-index --find-links "$LMFORGE_WHEELS" --target "$deps" $missing
    export PYTHONPATH="$PYTHONPATH:$deps"
fi

{
    echo "python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'))"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c 'import torch; from tasks.training.runtime import gpu_peak_flops as peak; name = torch.cuda.get_device_name(0); print("peak table:", repr(name), "bf16", peak(name, "bf16"), "fp32/TF32", peak(name, "fp32"))'
} | tee "$OUT/gpu_env.txt"

timeout 290 "$PY" benchmarks/pretrain.py --gpu --json "$OUT/pretrain_gpu.json" 2>&1 | tee "$OUT/pretrain_gpu.log"
timeout 120 "$PY" benchmarks/pretrain.py --gpu --generate 2>&1 | tee "$OUT/generate_gpu.log"
