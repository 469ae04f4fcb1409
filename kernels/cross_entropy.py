"""The LM head and its cross-entropy, chunk by chunk of rows, so the (tokens x vocab) logits never exist at once.

    loss = fused_linear_cross_entropy(hidden, weight, targets)   # F.cross_entropy(F.linear(hidden, weight), targets)

For each chunk of rows: logits = h W^T + b (a library matmul), then one kernel computes each row's
loss and overwrites the logits with their gradient, scale * (softmax - onehot); two more matmuls fold
that into dL/dh for the chunk's rows and into dL/dW, dL/db (accumulated in fp32). For a mean or sum,
and when a gradient is wanted, this happens during the forward pass (as Liger-Kernel does) and
backward only scales the stored gradients by the incoming one: three matmuls over the vocabulary, as
with full logits. With reduction='none' each row's incoming gradient differs, so backward recomputes
the chunks. Memory for the head falls from tokens x vocab to chunk x vocab, plus dL/dW.

The per-chunk step is the Triton kernel of `cross_entropy_triton.py` when Triton runs for the tensors'
device (`kernels.runtime`), else its PyTorch reference `cross_entropy_rows_torch`: the same chunks
either way. `linear_cross_entropy_reference` is the plain full-logits formula both are tested against.
The chunk loop is a `torch.library` custom op, so `torch.compile` keeps it whole (no graph break).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.runtime import triton_runs_on

REDUCTIONS = ("mean", "sum", "none")
CHUNK_ELEMENTS = 2**25       # logits per chunk: 64 MiB in bf16 (50,304-word vocabulary: 640 rows)


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                                   bias: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """The plain formula: full logits in the inputs' dtype, cross-entropy in fp32."""
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                           reduction=reduction).view(targets.shape if reduction == "none" else ())


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                               bias: Tensor | None = None, reduction: str = "mean",
                               chunk_rows: int | None = None) -> Tensor:
    """cross_entropy(hidden @ weight.T + bias, targets) without materialising the logits; fp32 result.

    `hidden` (..., d), `weight` (vocab, d), `bias` (vocab,) or None, `targets` (...) class ids, rows
    whose target is `ignore_index` count for nothing. 'mean' divides by the rows not ignored (NaN if
    there are none, as `F.cross_entropy`), 'none' returns one loss per row. Under autocast the matmuls
    run in the autocast dtype, as `F.linear` would; the softmax is always fp32.
    """
    _check(hidden, weight, targets, bias, reduction, chunk_rows)
    hidden, weight, bias = _autocast(hidden.device.type, hidden, weight, bias)
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    chunk = chunk_rows or default_chunk_rows(weight.shape[0])
    loss, *_ = torch.ops.lmforge.linear_cross_entropy(
        flat_hidden.contiguous(), weight.contiguous(), bias, flat_targets.contiguous(), ignore_index, reduction,
        wants_grad and reduction != "none", chunk, triton_runs_on(hidden.device))
    return loss.view(targets.shape) if reduction == "none" else loss


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk: CHUNK_ELEMENTS logits, a multiple of 64 rows when that many fit."""
    rows = max(1, CHUNK_ELEMENTS // vocab)
    return rows - rows % 64 if rows >= 64 else rows


def _check(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, reduction: str,
           chunk_rows: int | None) -> None:
    """Shapes, dtypes and the reduction, each refused with what was expected."""
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: a chunk needs at least one row")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(REDUCTIONS)}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be (vocab, {hidden.shape[-1]}) for hidden "
                         f"{tuple(hidden.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must have hidden's leading shape {tuple(hidden.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class ids, not {targets.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} must be ({weight.shape[0]},), one per vocabulary id")


def _autocast(device_type: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors in the autocast dtype when autocast is on (what F.linear would cast them to)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


# ---- one chunk's cross-entropy: the PyTorch reference of the Triton kernel ---------------------------


def cross_entropy_rows_torch(logits: Tensor, targets: Tensor, ignore_index: int,
                             scale: Tensor | None = None) -> Tensor:
    """Per-row losses (fp32) of `logits` (rows, vocab); with `scale` (rows,), `logits` becomes its gradient."""
    x = logits.float()
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(x, dim=1)
    loss = torch.where(valid, lse - x.gather(1, safe[:, None]).squeeze(1), 0.0)
    if scale is not None:
        grad = x.sub_(lse[:, None]).exp_()          # in place: x is `logits` itself (fp32) or a scratch copy
        grad[torch.arange(len(safe), device=safe.device), safe] -= 1.0
        grad.mul_(torch.where(valid, scale, 0.0)[:, None])
        if grad is not logits:
            logits.copy_(grad)
    return loss


def _rows_step(use_triton: bool):
    """The per-chunk step: the Triton kernel or its PyTorch reference."""
    if not use_triton:
        return cross_entropy_rows_torch
    from kernels.cross_entropy_triton import cross_entropy_rows_triton

    return cross_entropy_rows_triton


# ---- the chunk loop ----------------------------------------------------------------------------------


def head_pass(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int,
              scale: Tensor | None, chunk_rows: int, use_triton: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(per-row losses, dL/dhidden, dL/dweight, dL/dbias) chunk by chunk; each row's gradient weighs `scale[row]`.

    Without `scale` only the losses are computed (the gradients come back empty).
    """
    step, n_rows = _rows_step(use_triton), hidden.shape[0]
    loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    if scale is None:
        for rows in _chunks(n_rows, chunk_rows):
            loss[rows] = step(F.linear(hidden[rows], weight, bias), targets[rows], ignore_index)
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    grad_h = torch.empty_like(hidden)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    grad_b = torch.zeros(weight.shape[:1], dtype=torch.float32, device=weight.device)
    for rows in _chunks(n_rows, chunk_rows):
        h = hidden[rows]
        logits = F.linear(h, weight, bias)
        loss[rows] = step(logits, targets[rows], ignore_index, scale[rows])     # logits become dL/dlogits
        torch.mm(logits, weight, out=grad_h[rows])
        _accumulate(grad_w, logits.t(), h)
        if bias is not None:
            grad_b += logits.sum(0, dtype=torch.float32)
    return loss, grad_h, grad_w.to(weight.dtype), grad_b.to(bias.dtype) if bias is not None else hidden.new_empty(0)


def _chunks(n_rows: int, chunk_rows: int) -> list[slice]:
    return [slice(start, min(start + chunk_rows, n_rows)) for start in range(0, n_rows, chunk_rows)]


def _accumulate(total: Tensor, a: Tensor, b: Tensor) -> None:
    """total += a @ b, in fp32: in place when a and b are fp32, else through one product in their dtype."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
    else:
        total += a @ b


def _check_targets(targets: Tensor, ignore_index: int, vocab: int) -> None:
    """Every target not ignored must be a vocabulary id (the kernel would read past the row otherwise)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if targets.is_cuda:               # no host sync: the check fails the stream like F.cross_entropy's does
        torch._assert_async(~bad.any(), f"fused_linear_cross_entropy: a target is outside [0, {vocab})")
        return
    if bad.any():
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{index}] = {int(targets[index])} is not a class id in [0, {vocab}) "
                         f"nor ignore_index={ignore_index}")


# ---- the custom op and its gradient -----------------------------------------------------------------


@torch.library.custom_op("lmforge::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int,
                          reduction: str, with_grad: bool, chunk_rows: int,
                          use_triton: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, and when `with_grad` the gradients of a mean/sum loss for an incoming gradient of 1, else empties)."""
    _check_targets(targets, ignore_index, weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        valid = (targets != ignore_index).sum()
        scale = None
        if with_grad:
            scale = (1.0 / valid.float() if reduction == "mean" else hidden.new_ones((), dtype=torch.float32))
            scale = scale.expand(hidden.shape[0])
        loss, grad_h, grad_w, grad_b = head_pass(hidden, weight, bias, targets, ignore_index, scale, chunk_rows,
                                                 use_triton)
    if reduction == "mean":
        loss = loss.sum() / valid
    elif reduction == "sum":
        loss = loss.sum()
    return loss, grad_h, grad_w, grad_b


@_linear_cross_entropy.register_fake
def _(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int, reduction: str,
      with_grad: bool, chunk_rows: int, use_triton: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    loss = hidden.new_empty(hidden.shape[:1] if reduction == "none" else (), dtype=torch.float32)
    if not with_grad:
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    return loss, torch.empty_like(hidden), torch.empty_like(weight), \
        torch.empty_like(bias) if bias is not None else hidden.new_empty(0)


@torch.library.custom_op("lmforge::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                                   ignore_index: int, grad_rows: Tensor, chunk_rows: int,
                                   use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of per-row losses weighed by `grad_rows`, the chunks recomputed (reduction='none')."""
    with torch.autocast(hidden.device.type, enabled=False):
        _, grad_h, grad_w, grad_b = head_pass(hidden, weight, bias, targets, ignore_index, grad_rows.float(),
                                              chunk_rows, use_triton)
    return grad_h, grad_w, grad_b


@_linear_cross_entropy_backward.register_fake
def _(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int, grad_rows: Tensor,
      chunk_rows: int, use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(hidden), torch.empty_like(weight), \
        torch.empty_like(bias) if bias is not None else hidden.new_empty(0)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    hidden, weight, bias, targets, ignore_index, reduction, with_grad, chunk_rows, use_triton = inputs
    ctx.has_bias, ctx.precomputed = bias is not None, with_grad
    if with_grad:
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.args = (ignore_index, reduction, chunk_rows, use_triton)


def _backward(ctx, grad_loss: Tensor, *unused: Tensor) -> tuple:
    """Scales the gradients computed in the forward pass, or recomputes them (reduction='none')."""
    if ctx.precomputed:
        grad_h, grad_w, grad_b = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    else:
        hidden, weight, bias, targets = ctx.saved_tensors
        ignore_index, reduction, chunk_rows, use_triton = ctx.args
        grad_rows = _row_gradients(grad_loss, targets, ignore_index, reduction)
        grad_h, grad_w, grad_b = _linear_cross_entropy_backward(hidden, weight, bias, targets, ignore_index,
                                                                grad_rows, chunk_rows, use_triton)
    return grad_h, grad_w, grad_b if ctx.has_bias else None, None, None, None, None, None, None


def _row_gradients(grad_loss: Tensor, targets: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """dL/d(row loss) for each row: the incoming gradient, shared out as the reduction did."""
    if reduction == "none":
        return grad_loss
    rows = grad_loss.expand(targets.shape[0])
    return rows / (targets != ignore_index).sum() if reduction == "mean" else rows


_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)
