"""The accelerator table behind MFU: each known GPU's own dense peaks, nothing for an unknown one."""
from __future__ import annotations

import pytest
import torch

from tasks.training.runtime import gpu_peak_flops, peak_flops

KNOWN = [  # (torch.cuda.get_device_name, bf16 peak, fp32 (TF32) peak)
    ("NVIDIA H200", 989e12, 495e12),
    ("NVIDIA H100 80GB HBM3", 989e12, 495e12),
    ("NVIDIA H100 PCIe", 756e12, 378e12),
    ("NVIDIA H100 NVL", 835e12, 418e12),
    ("NVIDIA GH200 480GB", 989e12, 495e12),
    ("NVIDIA A100-SXM4-40GB", 312e12, 156e12),
    ("NVIDIA A100 80GB PCIe", 312e12, 156e12),
    ("NVIDIA A10", 125e12, 62.5e12),
    ("NVIDIA A10G", 70e12, 35e12),
    ("NVIDIA L4", 121e12, 60e12),
    ("NVIDIA L40S", 362e12, 183e12),
    ("NVIDIA GeForce RTX 4090", 165e12, 82.6e12),
    ("NVIDIA GeForce RTX 3090", 71e12, 35.6e12),
    ("Tesla V100-SXM2-16GB", None, 15.7e12),          # no bf16 (and no TF32): plain FP32
    ("Tesla V100-PCIE-32GB", None, 14e12),
    ("Tesla T4", None, 8.1e12),
]


@pytest.mark.parametrize(("name", "bf16", "fp32"), KNOWN, ids=[k[0] for k in KNOWN])
def test_known_devices_have_their_own_bf16_and_fp32_peaks(name: str, bf16: float | None, fp32: float) -> None:
    assert gpu_peak_flops(name, "bf16") == bf16
    assert gpu_peak_flops(name, "fp32") == fp32


@pytest.mark.parametrize("name", ["NVIDIA B300", "AMD Instinct MI300X", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA A1000"])
def test_unknown_devices_get_no_peak(name: str) -> None:
    assert gpu_peak_flops(name, "bf16") is None and gpu_peak_flops(name, "fp32") is None


def test_a_configured_peak_wins_and_the_cpu_gets_an_estimate() -> None:
    cpu = torch.device("cpu")
    assert peak_flops(cpu, "bf16", 123e12) == 123e12
    assert 1e9 < peak_flops(cpu, "fp32", None) <= peak_flops(cpu, "bf16", None) < 1e15
