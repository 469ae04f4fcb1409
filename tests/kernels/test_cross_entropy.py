"""fused_linear_cross_entropy: the Triton kernel (interpreted on CPU) against the full-logits reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import LAUNCHES, backend, fused_linear_cross_entropy, linear_cross_entropy_reference
from kernels.cross_entropy import cross_entropy_rows_torch, default_chunk_rows

ROWS, VOCAB, WIDTH = 37, 301, 24          # none a multiple of any block size
IGNORE = -100


def problem(bias: bool, rows: int = ROWS, vocab: int = VOCAB, width: int = WIDTH, seed: int = 0,
            dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    """hidden, weight, bias (or None) needing gradients, and targets with every fifth row ignored."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"hidden": torch.randn(rows, width, generator=g), "weight": torch.randn(vocab, width, generator=g) / 4,
               "bias": torch.randn(vocab, generator=g) if bias else None}
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::5] = IGNORE
    out = {k: None if v is None else v.to(device, dtype).requires_grad_() for k, v in tensors.items()}
    return {**out, "targets": targets.to(device)}


def loss_and_grads(fn, p: dict, reduction: str, **kwargs) -> list[torch.Tensor]:
    """[loss, d/dhidden, d/dweight, (d/dbias)] for a random upstream gradient (the same for every fn)."""
    loss = fn(p["hidden"], p["weight"], p["targets"], ignore_index=IGNORE, bias=p["bias"], reduction=reduction,
              **kwargs)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss.device)
    inputs = [t for t in (p["hidden"], p["weight"], p["bias"]) if t is not None]
    return [loss.detach(), *torch.autograd.grad((loss * upstream).sum(), inputs)]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_the_reference_in_value_and_gradient(bias: bool, reduction: str) -> None:
    p = problem(bias)
    before = LAUNCHES["cross_entropy_rows"]
    fused = loss_and_grads(fused_linear_cross_entropy, p, reduction, chunk_rows=10)     # 4 chunks, the last short
    reference = loss_and_grads(linear_cross_entropy_reference, p, reduction)
    # 4 chunks in the forward pass, 4 more when 'none' recomputes them for the gradient
    assert LAUNCHES["cross_entropy_rows"] - before == (8 if reduction == "none" else 4)
    assert len(fused) == (4 if bias else 3)
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_chunk_and_default_chunking_agree_with_many_chunks() -> None:
    p = problem(bias=True)
    results = [loss_and_grads(fused_linear_cross_entropy, p, "mean", chunk_rows=rows) for rows in (1, 7, None)]
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert default_chunk_rows(50304) == 640 and default_chunk_rows(2**26) == 1


@pytest.mark.parametrize("block_m, block_n", [(1, 64), (16, 128), (4, 512)])
def test_the_kernel_matches_its_pytorch_reference_for_any_block_shape(block_m: int, block_n: int) -> None:
    """One row per program is the GPU launch; many rows per program the interpreter's: the same code."""
    from kernels.cross_entropy_triton import cross_entropy_rows_triton

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(ROWS, VOCAB, generator=g) * 3
    targets = torch.randint(0, VOCAB, (ROWS,), generator=g)
    targets[3::4] = -1
    scale = torch.rand(ROWS, generator=g)
    mine, theirs = logits.clone(), logits.clone()
    loss = cross_entropy_rows_triton(mine, targets, -1, scale, block_m=block_m, block_n=block_n)
    expected = cross_entropy_rows_torch(theirs, targets, -1, scale)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)          # the gradient, written in place
    assert torch.all(loss[3::4] == 0) and torch.all(mine[3::4] == 0)       # ignored rows: no loss, no gradient
    torch.testing.assert_close(loss[:3], F.cross_entropy(logits[:3], targets[:3], reduction="none"))


def test_a_first_column_block_of_minus_infinity_is_no_nan() -> None:
    """-inf logits (a bias that forbids the first ids): the online softmax must not shift by -inf - -inf."""
    from kernels.cross_entropy_triton import cross_entropy_rows_triton

    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(4))
    logits[:, :130] = float("-inf")                      # the first two blocks of 64 columns, and two more
    targets = torch.tensor([200, 131, 300, 150, IGNORE])
    mine, theirs = logits.clone(), logits.clone()
    loss = cross_entropy_rows_triton(mine, targets, IGNORE, torch.ones(5), block_m=2, block_n=64)
    expected = cross_entropy_rows_torch(theirs, targets, IGNORE, torch.ones(5))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(mine, theirs)
    assert torch.isfinite(loss).all() and torch.isfinite(mine).all()


def test_the_dispatcher_runs_triton_only_when_it_can(monkeypatch: pytest.MonkeyPatch) -> None:
    p = problem(bias=False)
    assert backend("cpu") == "triton-interpreter"
    before = LAUNCHES["cross_entropy_rows"]
    interpreted = fused_linear_cross_entropy(p["hidden"], p["weight"], p["targets"], IGNORE)
    assert LAUNCHES["cross_entropy_rows"] > before                          # the kernel ran, not the fallback
    monkeypatch.delenv("TRITON_INTERPRET")
    assert backend("cpu") == "torch"
    before = LAUNCHES["cross_entropy_rows"]
    fallback = fused_linear_cross_entropy(p["hidden"], p["weight"], p["targets"], IGNORE)
    assert LAUNCHES["cross_entropy_rows"] == before                         # CPU without the interpreter: PyTorch
    torch.testing.assert_close(interpreted, fallback)


def test_the_pytorch_fallback_matches_the_reference_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    p = problem(bias=True)
    for got, want in zip(loss_and_grads(fused_linear_cross_entropy, p, "mean", chunk_rows=8),
                         loss_and_grads(linear_cross_entropy_reference, p, "mean")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_batched_hidden_states_and_no_gradient_mode() -> None:
    p = problem(bias=False, rows=24)
    hidden, targets = p["hidden"].view(3, 8, WIDTH), p["targets"].view(3, 8)
    with torch.no_grad():
        rows = fused_linear_cross_entropy(hidden, p["weight"], targets, IGNORE, reduction="none")
        mean = fused_linear_cross_entropy(hidden, p["weight"], targets, IGNORE)
    assert rows.shape == (3, 8) and not mean.requires_grad
    torch.testing.assert_close(rows, linear_cross_entropy_reference(hidden, p["weight"], targets, IGNORE, None, "none"))
    torch.testing.assert_close(mean, rows.sum() / (targets != IGNORE).sum())


def test_bf16_autocast_matches_the_reference_within_bf16_tolerance() -> None:
    p = problem(bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss_and_grads(fused_linear_cross_entropy, p, "mean", chunk_rows=16)
        reference = loss_and_grads(linear_cross_entropy_reference, p, "mean")
    assert fused[0].dtype == torch.float32 and fused[2].dtype == torch.float32   # grads reach the fp32 weights
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_all_rows_ignored_gives_nan_mean_and_zero_sum_like_the_reference() -> None:
    p = problem(bias=False, rows=6)
    targets = torch.full((6,), IGNORE)
    for reduction in ("mean", "sum"):
        got = fused_linear_cross_entropy(p["hidden"], p["weight"], targets, IGNORE, reduction=reduction)
        want = linear_cross_entropy_reference(p["hidden"], p["weight"], targets, IGNORE, reduction=reduction)
        torch.testing.assert_close(got, want, equal_nan=True)
    got.backward()
    assert torch.count_nonzero(p["hidden"].grad) == 0 and torch.count_nonzero(p["weight"].grad) == 0


def test_bad_inputs_are_refused_naming_what_is_wrong() -> None:
    p = problem(bias=False, rows=6)
    hidden, weight, targets = p["hidden"], p["weight"], p["targets"]
    bad = targets.clone()
    bad[4] = VOCAB
    with pytest.raises(ValueError, match=rf"targets\[4\] = {VOCAB} is not a class id in \[0, {VOCAB}\)"):
        fused_linear_cross_entropy(hidden, weight, bad, IGNORE)
    with pytest.raises(ValueError, match=r"weight \(301, 23\) must be \(vocab, 24\)"):
        fused_linear_cross_entropy(hidden, weight[:, :23], targets, IGNORE)
    with pytest.raises(ValueError, match=r"targets \(5,\) must have hidden's leading shape \(6,\)"):
        fused_linear_cross_entropy(hidden, weight, targets[:5], IGNORE)
    with pytest.raises(ValueError, match="reduction='avg': expected one of mean, sum, none"):
        fused_linear_cross_entropy(hidden, weight, targets, IGNORE, reduction="avg")
    with pytest.raises(ValueError, match=r"bias \(3,\) must be \(301,\)"):
        fused_linear_cross_entropy(hidden, weight, targets, IGNORE, bias=torch.zeros(3))


def test_torch_compile_keeps_the_op_whole() -> None:
    """A custom op: dynamo traces it as one node (fullgraph, no graph break), forward and backward."""
    p = problem(bias=True)

    def step(hidden, weight, bias, targets):
        return fused_linear_cross_entropy(hidden, weight, targets, IGNORE, bias=bias)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(p["hidden"], p["weight"], p["bias"], p["targets"])
    grads = torch.autograd.grad(loss, [p["hidden"], p["weight"], p["bias"]])
    expected = loss_and_grads(linear_cross_entropy_reference, p, "mean")
    upstream = torch.randn((), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss.detach(), expected[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected[1:]):
        torch.testing.assert_close(got * upstream, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_at_gpt2_vocabulary(dtype: torch.dtype) -> None:
    p = problem(bias=False, rows=2048 + 7, vocab=50304, width=768, dtype=dtype, device="cuda")
    before = LAUNCHES["cross_entropy_rows"]
    fused = loss_and_grads(fused_linear_cross_entropy, p, "mean")
    reference = loss_and_grads(linear_cross_entropy_reference, p, "mean")
    assert LAUNCHES["cross_entropy_rows"] > before
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got.float(), want.float(), **tolerance)
