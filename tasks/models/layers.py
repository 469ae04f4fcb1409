"""The pieces GPT and BERT share: multi-head self-attention, the GELU MLP, GPT-2 initialisation, a KV cache.

Attention runs through `scaled_dot_product_attention` (flash kernels where the hardware has them).
Masks are boolean, True where a query may attend to a key.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from storage.formats import ModelSpec

INIT_STD = 0.02


class ModelOutput(NamedTuple):
    logits: torch.Tensor | None
    loss: torch.Tensor | None         # what backward() sees (auxiliary losses included)
    lm_loss: torch.Tensor | None      # the language-model loss alone, for logging


class LayerCache:
    """One layer's keys and values for the positions seen so far, preallocated to `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores (batch, heads, new, head_dim) keys/values at `start`; returns all of them so far."""
        end = start + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; asked to write up to {end}")
        if self.k is None:        # allocated on first use, in the dtype autocast gives the keys
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Every layer's keys and values; `length` positions are filled (advanced once per forward)."""

    def __init__(self, n_layer: int, capacity: int) -> None:
        self.layers = [LayerCache(capacity) for _ in range(n_layer)]
        self.length = 0


def split_heads(qkv: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, time, 3 * width) -> q, k, v as (batch, heads, time, head_dim) views (no copies)."""
    batch, seq, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    return tuple(t.view(batch, seq, n_head, width // n_head).transpose(1, 2) for t in qkv.split(width, dim=2))


class SelfAttention(nn.Module):
    """softmax(q k^T / sqrt(d_head) + mask) v over `n_head` heads, then the output projection."""

    def __init__(self, spec: ModelSpec, causal: bool) -> None:
        super().__init__()
        self.n_head, self.dropout, self.causal = spec.n_head, spec.dropout, causal
        self.qkv = nn.Linear(spec.d_model, 3 * spec.d_model, bias=spec.bias)
        self.proj = nn.Linear(spec.d_model, spec.d_model, bias=spec.bias)
        self.proj.residual = True

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: LayerCache | None = None,
                start: int = 0) -> torch.Tensor:
        """`mask` (batch, 1, time|1, keys): True where attention is allowed; `cache`: keys before `start`."""
        batch, seq, width = x.shape
        q, k, v = split_heads(self.qkv(x), self.n_head)
        if cache is not None:
            k, v = cache.extend(k, v, start)
        dropout = self.dropout if self.training else 0.0
        is_causal = self.causal and mask is None and start == 0
        if self.causal and mask is None and start > 0 and seq > 1:     # one new query may see every key
            mask = causal_mask(seq, k.shape[2], x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))


def causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """(queries, keys): the last `queries` positions of `keys`, each seeing itself and what came before."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, 1, time, time) from a (batch, time) 1/0 mask: causal, real keys only, and always itself.

    A padding query sees only itself, so no row of the softmax is empty (an empty row is NaN, and
    NaN values leak through zero attention weights into the next layer).
    """
    seq = attention_mask.shape[1]
    allowed = causal_mask(seq, seq, attention_mask.device)[None] & attention_mask.bool()[:, None, :]
    return (allowed | torch.eye(seq, dtype=torch.bool, device=attention_mask.device))[:, None]


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_mlp, bias=bias)
        self.proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.proj.residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact (erf) GELU: GPT-2 used the tanh approximation, which is 2.4x slower in bf16 on CPUs.
        return self.proj(F.gelu(self.fc(x)))


def init_weights(module: nn.Module, residual_std: float = INIT_STD) -> None:
    """N(0, 0.02) for matrices and embeddings (`residual_std` for residual projections), zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        std = residual_std if getattr(module, "residual", False) else INIT_STD
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
