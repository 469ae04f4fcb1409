"""LayerNorm over the last dimension: one Triton kernel forward, one backward, beside `F.layer_norm`.

    y = layer_norm(x, weight, bias, eps)        # == F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    fuse_layer_norms(model)                     # every nn.LayerNorm in `model` now calls it

The forward keeps each row's mean and 1/std (fp32) so the backward reads x and dy once: dx, and
per-program partial sums of dweight and dbias that one `sum` finishes (deterministic, no atomics).
The kernels run where Triton runs for the input's device (`kernels.runtime`), else `F.layer_norm` does;
so does it for float64 input, which the kernels would normalise in fp32 only.
Both passes are `torch.library` custom ops, so `torch.compile` keeps them whole (no graph break).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.runtime import triton_runs_on

MAX_WIDTH = 16384            # as kernels.layer_norm_triton.MAX_WIDTH (that module imports triton)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)     # the kernels' arithmetic is fp32


def layer_norm_reference(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                         eps: float = 1e-5) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """`F.layer_norm` over the last dimension, by the Triton kernels where they run.

    Under CUDA autocast the input is normalised in fp32, as autocast runs `layer_norm` in fp32 there.
    """
    if not triton_runs_on(x.device) or x.shape[-1] > MAX_WIDTH or x.numel() == 0 or x.dtype not in KERNEL_DTYPES:
        return layer_norm_reference(x, weight, bias, eps)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and param.shape != x.shape[-1:]:
            raise ValueError(f"layer_norm: {name} {tuple(param.shape)} must be ({x.shape[-1]},) for x "
                             f"{tuple(x.shape)}")
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        x = x.float()
    y, _, _ = torch.ops.lmforge.layer_norm(x.contiguous(), weight, bias, eps)
    return y


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters, same state-dict keys) whose forward is `kernels.layer_norm`."""

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


def fuse_layer_norms(model: nn.Module) -> int:
    """Replaces every `nn.LayerNorm` over one dimension in `model` by a `LayerNorm` sharing its parameters.

    Call it before building the optimizer or wrapping the model (the parameters stay the same
    objects, so either order works, but hooks on the old modules would be lost). Returns how many.
    """
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.LayerNorm and len(child.normalized_shape) == 1]
    for parent, name, old in found:
        setattr(parent, name, _fused_copy(old))
    return len(found)


def _fused_copy(old: nn.LayerNorm) -> LayerNorm:
    new = LayerNorm(old.normalized_shape, old.eps, old.elementwise_affine, bias=old.bias is not None, device="meta")
    new.weight, new.bias = old.weight, old.bias
    new.train(old.training)
    return new


# ---- the custom ops ---------------------------------------------------------------------------------


@torch.library.custom_op("lmforge::layer_norm", mutates_args=())
def _layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): mean and 1/std per row, in fp32, kept for the backward pass."""
    from kernels.layer_norm_triton import layer_norm_forward_triton

    y, mean, rstd = layer_norm_forward_triton(x.view(-1, x.shape[-1]), weight, bias, eps)
    return y.view(x.shape), mean, rstd


@_layer_norm.register_fake
def _(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    rows = x.numel() // x.shape[-1]
    return torch.empty_like(x), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("lmforge::layer_norm_backward", mutates_args=())
def _layer_norm_backward(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
                         has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); the parameter gradients in the parameters' dtype (empty where there is none)."""
    from kernels.layer_norm_triton import layer_norm_backward_triton

    width = x.shape[-1]
    dx, dweight, dbias = layer_norm_backward_triton(dy.contiguous().view(-1, width), x.view(-1, width), weight,
                                                    mean, rstd)
    dweight = dweight.to(weight.dtype) if weight is not None else x.new_empty(0)
    dbias = dbias.to(weight.dtype if weight is not None else x.dtype) if has_bias else x.new_empty(0)
    return dx.view(x.shape), dweight, dbias


@_layer_norm_backward.register_fake
def _(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
      has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    width = x.shape[-1]
    dweight = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    dbias = x.new_empty(width, dtype=weight.dtype if weight is not None else x.dtype) if has_bias else x.new_empty(0)
    return torch.empty_like(x), dweight, dbias


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(x, weight, mean, rstd)


def _backward(ctx, dy: Tensor, *unused: Tensor) -> tuple:
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _layer_norm_backward(dy, x, weight, mean, rstd, ctx.has_bias)
    return dx, dweight if ctx.has_weight else None, dbias if ctx.has_bias else None, None


_layer_norm.register_autograd(_backward, setup_context=_setup_context)
