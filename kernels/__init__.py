"""Compute hot spots of training as Triton kernels, each beside its plain-PyTorch reference.

    loss = fused_linear_cross_entropy(hidden, lm_head.weight, targets)    # no (tokens x vocab) logits
    y = layer_norm(x, weight, bias, eps)                                  # F.layer_norm, fused fwd + bwd

Each public function is a dispatcher: the Triton kernel when it can run for the tensors' device (CUDA
with Triton installed, or any device under `TRITON_INTERPRET=1`, Triton's interpreter), else the
PyTorch reference. `backend(device)` says which; `runtime.LAUNCHES` counts kernel launches.
Importing this package imports torch, never triton (an optional dependency: the [test]/[dev] extras).
Attention stays on `F.scaled_dot_product_attention`, whose flash kernels already exist.
"""
from __future__ import annotations

from kernels.cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference
from kernels.layer_norm import LayerNorm, fuse_layer_norms, layer_norm, layer_norm_reference
from kernels.runtime import LAUNCHES, backend, why_not_triton

__all__ = ["LAUNCHES", "LayerNorm", "backend", "fuse_layer_norms", "fused_linear_cross_entropy", "layer_norm",
           "layer_norm_reference", "linear_cross_entropy_reference", "why_not_triton"]
