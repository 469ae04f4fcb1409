"""The Triton half of `kernels.layer_norm`: LayerNorm over the last dimension, forward and backward.

Imported only when a kernel is about to run (it needs `triton`). The reference is `F.layer_norm`.
A program holds BLOCK_M whole rows (BLOCK_N >= the row width); statistics in fp32 whatever the dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.runtime import Kernel, interpreting

MAX_WIDTH = 16384            # a row must fit one program's registers; wider rows use F.layer_norm


@Kernel
def layer_norm_forward(x_ptr, weight_ptr, bias_ptr, y_ptr, mean_ptr, rstd_ptr, n_rows, n_cols, eps,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """y = (x - mean) * rstd * weight + bias per row, rstd = 1 / sqrt(var + eps) (biased variance); keeps mean, rstd."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < n_rows, cols < n_cols
    inside = row_ok[:, None] & col_ok[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    centered = tl.where(inside, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / n_cols + eps)
    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@Kernel
def layer_norm_backward(dy_ptr, x_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, dweight_ptr, dbias_ptr, n_rows,
                        n_cols, rows_per_program, HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """dx for each row; this program's share of dweight = sum dy * xhat and dbias = sum dy, one row each.

    With xhat = (x - mean) * rstd and g = dy * weight: dx = rstd * (g - mean(g * xhat) * xhat - mean(g)).
    Program p takes rows [p * rows_per_program, (p + 1) * rows_per_program), a multiple of BLOCK_M.
    """
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        weight = tl.full((BLOCK_N,), 1.0, tl.float32)
    dweight = tl.zeros((BLOCK_N,), tl.float32)
    dbias = tl.zeros((BLOCK_N,), tl.float32)
    first = program * rows_per_program
    for start in range(first, first + rows_per_program, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        inside = row_ok[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(inside, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * weight[None, :]
        mean_gx = tl.sum(g * xhat, axis=1) / n_cols
        mean_g = tl.sum(g, axis=1) / n_cols
        dx = (g - xhat * mean_gx[:, None] - mean_g[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        dweight += tl.sum(dy * xhat, axis=0)
        dbias += tl.sum(dy, axis=0)
    tl.store(dweight_ptr + program * n_cols + cols, dweight, mask=col_ok)
    tl.store(dbias_ptr + program * n_cols + cols, dbias, mask=col_ok)


def blocks(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): rows of up to ~4k elements per program on a GPU, 64 under the interpreter."""
    block_n = triton.next_power_of_2(n_cols)
    if interpreting():
        return 64, block_n, 1
    return max(1, min(16, 4096 // block_n)), block_n, min(16, max(1, block_n // 256))


def layer_norm_forward_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                              block_m: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd) for a contiguous (rows, width) `x`."""
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    mean, rstd = (torch.empty(n_rows, dtype=torch.float32, device=x.device) for _ in range(2))
    default_m, block_n, warps = blocks(n_cols)
    block_m = block_m or default_m
    layer_norm_forward[(triton.cdiv(n_rows, block_m),)](
        x, x if weight is None else weight, x if bias is None else bias, y, mean, rstd, n_rows, n_cols, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y, mean, rstd


def layer_norm_backward_triton(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                               rstd: torch.Tensor, block_m: int | None = None,
                               programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias), the last two summed over rows in fp32 (per-program partials, then one sum)."""
    n_rows, n_cols = x.shape
    dx = torch.empty_like(x)
    default_m, block_n, warps = blocks(n_cols)
    block_m = block_m or default_m
    programs = min(programs or _programs(x.device), triton.cdiv(n_rows, block_m))
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), block_m) * block_m
    programs = triton.cdiv(n_rows, rows_per_program)
    partial_w, partial_b = (torch.empty(programs, n_cols, dtype=torch.float32, device=x.device) for _ in range(2))
    layer_norm_backward[(programs,)](
        dy, x, x if weight is None else weight, mean, rstd, dx, partial_w, partial_b, n_rows, n_cols,
        rows_per_program, HAS_WEIGHT=weight is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return dx, partial_w.sum(0), partial_b.sum(0)


def _programs(device: torch.device) -> int:
    """Programs for the backward pass: a few per streaming multiprocessor on a GPU, a handful when interpreting."""
    if interpreting() or device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count
