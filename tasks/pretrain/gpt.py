"""GPT: a decoder-only language model, Pr(w_n | w_1..w_{n-1}), in the GPT-2 layout.

Pre-LayerNorm blocks, causal attention through `scaled_dot_product_attention` (flash kernels where
the hardware has them), a GELU MLP of 4x width (or a mixture of experts), learned positions, and the
output projection tied to the token embedding. GPT-2 initialisation: N(0, 0.02), residual
projections scaled by 1/sqrt(2 * n_layer).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tasks.pretrain.config import ModelSpec
from tasks.pretrain.moe import MoE

INIT_STD = 0.02


class ModelOutput(NamedTuple):
    logits: torch.Tensor | None
    loss: torch.Tensor | None         # what backward() sees (auxiliary losses included)
    lm_loss: torch.Tensor | None      # the language-model loss alone, for logging


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.n_head, self.dropout = spec.n_head, spec.dropout
        self.qkv = nn.Linear(spec.d_model, 3 * spec.d_model, bias=spec.bias)
        self.proj = nn.Linear(spec.d_model, spec.d_model, bias=spec.bias)
        self.proj.residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = split_heads(self.qkv(x), self.n_head)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))


def split_heads(qkv: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, time, 3 * width) -> q, k, v as (batch, heads, time, head_dim) views (no copies)."""
    batch, seq, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    return tuple(t.view(batch, seq, n_head, width // n_head).transpose(1, 2) for t in qkv.split(width, dim=2))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_mlp, bias=bias)
        self.proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.proj.residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact (erf) GELU: GPT-2 used the tanh approximation, which is 2.4x slower in bf16 on CPUs.
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps, bias=spec.bias)
        self.attn = CausalSelfAttention(spec)
        self.ln2 = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps, bias=spec.bias)
        self.mlp = MoE(spec) if spec.n_experts else MLP(spec.d_model, spec.d_mlp, spec.bias)
        self.drop = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.wte = nn.Embedding(spec.padded_vocab_size, spec.d_model)
        self.wpe = nn.Embedding(spec.seq_len, spec.d_model)
        self.drop = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.n_layer))
        self.ln_f = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps, bias=spec.bias)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = INIT_STD / math.sqrt(2 * self.spec.n_layer) if getattr(module, "residual", False) else INIT_STD
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        """Logits for every position; with `targets` (-1 = ignore) also the mean cross-entropy."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)       # tied to the input embedding
        if targets is None:
            return ModelOutput(logits, None, None)
        lm_loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return ModelOutput(logits, lm_loss + self.aux_loss(), lm_loss)

    def aux_loss(self) -> torch.Tensor | float:
        """The mixture-of-experts balancing loss of the last forward (0 for dense MLPs)."""
        if not self.spec.n_experts:
            return 0.0
        return self.spec.aux_loss_weight * sum(block.mlp.balance_loss for block in self.blocks)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Samples `max_new_tokens` continuations of `idx` (batch, time); padded ids are never drawn."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.spec.seq_len:]).logits[:, -1, : self.spec.vocab_size].float()
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx
