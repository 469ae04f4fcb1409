"""Where a worker runs: device, process group, precision, the device's peak FLOP/s, parent death.

Run as a module (`python -m tasks.training.runtime TORCHRUN-ARGS`) it becomes `torchrun` after
asking the kernel to SIGTERM it when the stage process dies, so a killed stage never leaves an
orphaned agent; workers do the same towards the agent (`die_with_parent`).
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import re
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

PR_SET_PDEATHSIG = 1
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)

# Dense (no sparsity) peak FLOP/s of one GPU: (name pattern, bf16 tensor core, fp32 matmul). fp32 runs use TF32
# tensor cores (`init_distributed` enables them) where the GPU has them, plain FP32 where it has not; a GPU
# without bf16 has None there. First match wins, so the specific names come first. Sources: NVIDIA datasheets
# (their tensor figures are "with sparsity", twice the dense rate, halved here).
GPU_PEAKS: tuple[tuple[str, float | None, float], ...] = (
    (r"\bGH200\b", 989e12, 495e12),        # GH200 datasheet: H100 SXM rates
    (r"\bH200 NVL\b", 835e12, 418e12),     # H200 datasheet, NVL: BF16 1,671*, TF32 835*
    (r"\bH200\b", 989e12, 495e12),         # H200 datasheet, SXM: BF16 1,979*, TF32 989*
    (r"\bH100 NVL\b", 835e12, 418e12),     # H100 datasheet, NVL: BF16 1,671*, TF32 835*
    (r"\bH100 PCIe\b", 756e12, 378e12),    # H100 datasheet, PCIe: BF16 1,513*, TF32 756*
    (r"\bH100\b", 989e12, 495e12),         # H100 datasheet, SXM ("H100 80GB HBM3"): BF16 1,979*, TF32 989*
    (r"\bA100\b", 312e12, 156e12),         # A100 datasheet (SXM and PCIe): BF16 312, TF32 156
    (r"\bA10G\b", 70e12, 35e12),           # AWS G5 A10G (no NVIDIA datasheet): BF16 70, TF32 35
    (r"\bA10\b", 125e12, 62.5e12),         # A10 datasheet: BF16 250*, TF32 125*
    (r"\bL40S\b", 362e12, 183e12),         # L40S datasheet: BF16 733*, TF32 366*
    (r"\bL40\b", 181e12, 90.5e12),         # L40 datasheet: BF16 362*, TF32 181*
    (r"\bL4\b", 121e12, 60e12),            # L4 datasheet: BF16 242*, TF32 120*
    (r"\bRTX 4090\b", 165e12, 82.6e12),    # Ada whitepaper, RTX 4090: BF16 (FP32 accumulate) 165.2, TF32 82.6
    (r"\bRTX 3090\b(?! Ti)", 71e12, 35.6e12),  # GA102 whitepaper, RTX 3090: BF16 (FP32 acc.) 71, TF32 35.6
    (r"\bV100-PCIE\b", None, 14e12),       # V100 datasheet, PCIe: no bf16, no TF32; FP32 14
    (r"\bV100S\b", None, 16.4e12),         # V100S datasheet: FP32 16.4
    (r"\bV100\b", None, 15.7e12),          # V100 datasheet, SXM2: FP32 15.7
    (r"\bT4\b", None, 8.1e12),             # T4 datasheet: no bf16, no TF32; FP32 8.1
)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent exits (a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:          # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def choose_device(requested: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK when asked for (or `auto` and available), else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device; use device='auto' or 'cpu'")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                               "lower nproc_per_node")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(requested_device: str) -> DistEnv:
    """Reads torchrun's environment and joins the process group (nccl on GPU, gloo on CPU)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = choose_device(requested_device, local_rank)
    if world > 1:
        if device.type == "cuda":
            dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True     # fp32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    return DistEnv(rank, local_rank, world, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_precision(requested: str, device: torch.device) -> str:
    """bf16 where the device supports it, else fp32 (a pre-Ampere GPU)."""
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print("training: this GPU has no bf16; training in fp32", file=sys.stderr)
        return "fp32"
    return requested


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (weights and optimizer stay fp32), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def gpu_peak_flops(name: str, precision: str) -> float | None:
    """The dense peak of the GPU called `name` at `precision`, or None when the table does not know it."""
    for pattern, bf16, fp32 in GPU_PEAKS:
        if re.search(pattern, name):
            return bf16 if precision == "bf16" else fp32
    return None


def peak_flops(device: torch.device, precision: str, configured: float | None) -> float | None:
    """Peak FLOP/s of one GPU, or of this process's CPU threads: configured, else the table or an estimate.

    None for a GPU the table does not know: MFU is then not reported, rather than a guess.
    """
    if configured:
        return configured
    if device.type == "cuda":
        return gpu_peak_flops(device_name(device), precision)
    return cpu_peak_flops(precision)


def cpu_peak_flops(precision: str) -> float:
    """A rough CPU peak for this process: its threads x clock x FLOP per cycle of the vector units.

    Two FMA pipes per core; 256-bit wide on AMD (Zen 4 splits AVX-512 in two) and on AVX2-only
    Intel, 512-bit on Intel with AVX-512; bf16 dot-product instructions double it. An estimate:
    set `peak_flops` in the recipe for a figure you trust.
    """
    flags, vendor = _cpu_flags()
    lanes = 16 if ("avx512f" in flags and "AMD" not in vendor) else 8 if "avx2" in flags else 4
    per_cycle = 2 * 2 * lanes                               # 2 pipes x (multiply + add) x lanes
    if precision == "bf16" and ("avx512_bf16" in flags or "amx_bf16" in flags):
        per_cycle *= 2
    return torch.get_num_threads() * _cpu_hz() * per_cycle


def _cpu_flags() -> tuple[set[str], str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set(), ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    vendor = next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith("vendor_id")), "")
    return set(flags), vendor


def _cpu_hz() -> float:
    import psutil

    freq = psutil.cpu_freq()
    mhz = (freq.max or freq.current) if freq else 0.0
    return (mhz or 2500.0) * 1e6


if __name__ == "__main__":
    die_with_parent(signal.SIGTERM)
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *sys.argv[1:]])
