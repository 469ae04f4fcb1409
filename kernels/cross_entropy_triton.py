"""The Triton half of `kernels.cross_entropy`: the loss of a block of logit rows, and its gradient in place.

Imported only when a kernel is about to run (it needs `triton`). Its PyTorch reference, with the
same contract, is `kernels.cross_entropy.cross_entropy_rows_torch`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.runtime import Kernel, interpreting


@Kernel
def cross_entropy_rows(logits_ptr, logits_stride, targets_ptr, scale_ptr, scale_stride, loss_ptr, n_rows, n_cols,
                       ignore_index, WRITE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """loss[r] = logsumexp(logits[r]) - logits[r, target[r]], 0 where the target is `ignore_index`.

    With WRITE_GRAD the row is then overwritten by its gradient, scale[r] * (softmax(logits[r]) - onehot(target[r])).
    BLOCK_M rows per program, BLOCK_N columns at a time: one pass for the running max and sum of
    exponentials (the online softmax), a second for the gradient. Arithmetic in fp32 whatever the logits' dtype.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    # Rows past the end read the last row (never stored), so no all-masked row turns into NaNs.
    row_ptrs = logits_ptr + tl.minimum(rows, n_rows - 1).to(tl.int64) * logits_stride
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (targets != ignore_index)
    targets = tl.where(valid, targets, 0)

    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x = tl.load(row_ptrs[:, None] + cols[None, :], mask=cols[None, :] < n_cols, other=float("-inf"))
        x = x.to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        # Until a row has met a finite logit its max is -inf, and -inf - -inf is NaN: shift by 0 instead.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        sum_exp = sum_exp * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        running_max = new_max
    lse = running_max + tl.log(sum_exp)
    target_logit = tl.load(row_ptrs + targets).to(tl.float32)
    tl.store(loss_ptr + rows, tl.where(valid, lse - target_logit, 0.0), mask=row_ok)

    if WRITE_GRAD:
        scale = tl.load(scale_ptr + rows * scale_stride, mask=row_ok, other=0.0).to(tl.float32)
        scale = tl.where(valid, scale, 0.0)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            inside = row_ok[:, None] & (cols[None, :] < n_cols)
            x = tl.load(row_ptrs[:, None] + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            onehot = tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
            grad = (tl.exp(x - lse[:, None]) - onehot) * scale[:, None]
            tl.store(row_ptrs[:, None] + cols[None, :], grad.to(logits_ptr.dtype.element_ty), mask=inside)


def blocks(n_cols: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). On a GPU one row per program, wide column tiles; the interpreter
    runs a program at a time in Python, so there many rows per program keep it fast (same code)."""
    block_n = min(triton.next_power_of_2(n_cols), 4096)
    if interpreting():
        return 16, min(block_n, 1024), 1
    return 1, block_n, 8 if block_n >= 2048 else 4


def cross_entropy_rows_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                              scale: torch.Tensor | None = None, block_m: int | None = None,
                              block_n: int | None = None) -> torch.Tensor:
    """Per-row losses (fp32) of `logits` (rows, vocab); with `scale` (rows,), `logits` becomes its gradient."""
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss
    default_m, default_n, warps = blocks(n_cols, logits.device)
    block_m, block_n = block_m or default_m, block_n or default_n
    scale_arg = scale if scale is not None else loss          # not read without WRITE_GRAD
    cross_entropy_rows[(triton.cdiv(n_rows, block_m),)](
        logits, logits.stride(0), targets, scale_arg, scale_arg.stride(0), loss, n_rows, n_cols, ignore_index,
        WRITE_GRAD=scale is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return loss
