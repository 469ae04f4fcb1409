"""kernels.layer_norm: the Triton forward and backward (interpreted on CPU) against F.layer_norm."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels import LAUNCHES, LayerNorm, fuse_layer_norms, layer_norm, layer_norm_reference


def inputs(shape: tuple[int, ...], weight: bool, bias: bool, dtype: torch.dtype = torch.float32,
           device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    g = torch.Generator().manual_seed(0)
    width = shape[-1]
    x = torch.randn(shape, generator=g) * 2 + 0.5
    w = 1 + torch.randn(width, generator=g) / 5 if weight else None
    b = torch.randn(width, generator=g) if bias else None
    return tuple(None if t is None else t.to(device, dtype).requires_grad_() for t in (x, w, b))


def value_and_grads(fn, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None,
                    eps: float = 1e-5) -> list[torch.Tensor]:
    y = fn(x, w, b, eps)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    return [y.detach(), *torch.autograd.grad((y * upstream).sum(), [t for t in (x, w, b) if t is not None])]


@pytest.mark.parametrize("shape", [(37, 40), (3, 11, 100), (5, 3)], ids=["37x40", "3x11x100", "5x3"])
@pytest.mark.parametrize("weight, bias", [(True, True), (True, False), (False, False)],
                         ids=["affine", "no-bias", "no-affine"])
def test_matches_f_layer_norm_in_value_and_gradient(shape: tuple[int, ...], weight: bool, bias: bool) -> None:
    x, w, b = inputs(shape, weight, bias)
    before = (LAUNCHES["layer_norm_forward"], LAUNCHES["layer_norm_backward"])
    fused = value_and_grads(layer_norm, x, w, b)
    assert (LAUNCHES["layer_norm_forward"], LAUNCHES["layer_norm_backward"]) == (before[0] + 1, before[1] + 1)
    for got, want in zip(fused, value_and_grads(layer_norm_reference, x, w, b)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_m, programs", [(1, 3), (4, 5), (64, 1)])
def test_any_row_blocking_and_program_count_gives_the_same_gradients(block_m: int, programs: int) -> None:
    """One row per program is the GPU launch; uneven row shares per program sum the same parameter gradients."""
    from kernels.layer_norm_triton import layer_norm_backward_triton, layer_norm_forward_triton

    x, w, b = (t.detach() for t in inputs((29, 48), True, True))
    dy = torch.randn(29, 48, generator=torch.Generator().manual_seed(3))
    y, mean, rstd = layer_norm_forward_triton(x, w, b, 1e-5, block_m=block_m)
    dx, dw, db = layer_norm_backward_triton(dy, x, w, mean, rstd, block_m=block_m, programs=programs)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    yr = F.layer_norm(xr, (48,), wr, br, 1e-5)
    yr.backward(dy)
    torch.testing.assert_close(y, yr.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, x.mean(1))
    torch.testing.assert_close(rstd, 1 / torch.sqrt(x.var(1, unbiased=False) + 1e-5))
    for got, want in ((dx, xr.grad), (dw, wr.grad), (db, br.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_is_as_accurate_as_pytorch_bf16() -> None:
    """Against the float64 truth, the kernel's bf16 error is within twice PyTorch's own bf16 error."""
    x, w, b = inputs((19, 64), True, True, dtype=torch.bfloat16)
    fused = value_and_grads(layer_norm, x, w, b)
    assert [t.dtype for t in fused] == [torch.bfloat16] * 4
    torch_bf16 = value_and_grads(layer_norm_reference, x, w, b)
    truth = value_and_grads(layer_norm_reference, *(t.detach().double().requires_grad_() for t in (x, w, b)))
    for got, theirs, true in zip(fused, torch_bf16, truth):
        error, their_error = (got.double() - true).abs().max(), (theirs.double() - true).abs().max()
        assert error <= 2 * their_error + 1e-2, (error, their_error)


def test_rows_wider_than_a_program_fall_back_to_pytorch() -> None:
    x, w, b = inputs((2, 16385), True, True)
    before = LAUNCHES["layer_norm_forward"]
    torch.testing.assert_close(layer_norm(x, w, b), layer_norm_reference(x, w, b))
    assert LAUNCHES["layer_norm_forward"] == before


def test_float64_stays_with_f_layer_norm() -> None:
    """The kernels normalise in fp32: a float64 input (gradcheck, a float64 model) would lose its precision."""
    x, w, b = inputs((6, 10), True, True, dtype=torch.float64)
    before = LAUNCHES["layer_norm_forward"]
    for got, want in zip(value_and_grads(layer_norm, x, w, b), value_and_grads(layer_norm_reference, x, w, b)):
        assert got.dtype == torch.float64 and torch.equal(got, want)
    assert LAUNCHES["layer_norm_forward"] == before
    assert torch.autograd.gradcheck(layer_norm, (x, w, b))


def test_the_pytorch_fallback_runs_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    x, w, b = inputs((7, 12), True, True)
    before = LAUNCHES["layer_norm_forward"]
    assert torch.equal(layer_norm(x, w, b), F.layer_norm(x, (12,), w, b))
    assert LAUNCHES["layer_norm_forward"] == before


def test_fuse_layer_norms_swaps_modules_and_keeps_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Sequential(nn.GELU(), nn.LayerNorm(16, bias=False)),
                          nn.LayerNorm((4, 4)))            # two dimensions: not ours, left alone
    params, keys = list(model.parameters()), list(model.state_dict())
    x = torch.randn(5, 8)
    before = model[:3](x)
    assert fuse_layer_norms(model) == 2
    assert type(model[1]) is LayerNorm and type(model[2][1]) is LayerNorm and type(model[3]) is nn.LayerNorm
    assert list(model.parameters()) == params and list(model.state_dict()) == keys   # same tensors, same names
    launches = LAUNCHES["layer_norm_forward"]
    torch.testing.assert_close(model[:3](x), before, rtol=1e-5, atol=1e-5)
    assert LAUNCHES["layer_norm_forward"] == launches + 2


def test_torch_compile_keeps_the_op_whole() -> None:
    x, w, b = inputs((9, 24), True, True)
    compiled = torch.compile(lambda x, w, b, eps: layer_norm(x, w, b, eps), backend="aot_eager", fullgraph=True)
    for got, want in zip(value_and_grads(compiled, x, w, b), value_and_grads(layer_norm_reference, x, w, b)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_at_gpt2_width(dtype: torch.dtype) -> None:
    x, w, b = inputs((8 * 1024 + 3, 768), True, True, dtype=dtype, device="cuda")
    before = LAUNCHES["layer_norm_backward"]
    fused = value_and_grads(layer_norm, x, w, b)
    assert LAUNCHES["layer_norm_backward"] == before + 1
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for got, want in zip(fused, value_and_grads(layer_norm_reference, x, w, b)):
        torch.testing.assert_close(got.float(), want.float(), **tolerance)
