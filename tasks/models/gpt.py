"""GPT: a decoder-only language model, Pr(w_n | w_1..w_{n-1}), in the GPT-2 layout.

Pre-LayerNorm blocks, causal self-attention, a GELU MLP of 4x width (or a mixture of experts),
learned positions, and the output projection tied to the token embedding. GPT-2 initialisation:
N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer). `generate` decodes with a KV cache.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kernels import fused_linear_cross_entropy
from storage.formats import ModelSpec
from tasks.models.layers import (INIT_STD, MLP, KVCache, LayerCache, ModelOutput, SelfAttention, causal_padding_mask,
                                 init_weights)
from tasks.models.moe import MoE


class Block(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps, bias=spec.bias)
        self.attn = SelfAttention(spec, causal=True)
        self.ln2 = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps, bias=spec.bias)
        self.mlp = MoE(spec) if spec.n_experts else MLP(spec.d_model, spec.d_mlp, spec.bias)
        self.drop = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: LayerCache | None = None,
                start: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), mask, cache, start))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    # True: a loss with targets comes from `kernels.fused_linear_cross_entropy`, no logits (the pretrain
    # recipe's kernels.fused_ce sets it; not part of the model, so not in its spec).
    fused_ce = False

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.wte = nn.Embedding(spec.padded_vocab_size, spec.d_model)
        self.wpe = nn.Embedding(spec.seq_len, spec.d_model)
        self.drop = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.n_layer))
        self.ln_f = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps, bias=spec.bias)
        self.apply(partial(init_weights, residual_std=INIT_STD / math.sqrt(2 * spec.n_layer)))

    def hidden_states(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, time, d_model) after the final LayerNorm; `attention_mask` is 1 for real tokens.

        With a mask, padding on either side is invisible to real tokens: keys are masked, and
        positions count real tokens only, so a left-padded sequence gets the positions it has alone.
        """
        if segment_ids is not None:
            raise ValueError("GPT has no segment embeddings: pass segment_ids=None (join pairs with a separator)")
        return self._hidden(input_ids, attention_mask)

    def _hidden(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        if start + idx.shape[1] > self.spec.seq_len:
            raise ValueError(f"{start + idx.shape[1]} positions exceed the model's seq_len {self.spec.seq_len}")
        positions = _positions(attention_mask) if attention_mask is not None else \
            torch.arange(start, start + idx.shape[1], device=idx.device)
        mask = causal_padding_mask(attention_mask) if attention_mask is not None else None
        x = self.drop(self.wte(idx) + self.wpe(positions))
        layers = cache.layers if cache is not None else [None] * len(self.blocks)
        for block, layer_cache in zip(self.blocks, layers):
            x = block(x, mask, layer_cache, start)
        if cache is not None:
            cache.length += idx.shape[1]
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: the token embedding, transposed (tied weights)."""
        return F.linear(hidden, self.wte.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> ModelOutput:
        """Logits for every position; with `targets` (-1 = ignore) also the mean cross-entropy.

        With `cache`, `idx` continues the positions the cache holds (and is added to it). With
        `fused_ce` and targets, the logits are never formed and come back None.
        """
        hidden = self._hidden(idx, cache=cache)
        if targets is not None and self.fused_ce:
            lm_loss = fused_linear_cross_entropy(hidden, self.wte.weight, targets, ignore_index=-1)
            return ModelOutput(None, lm_loss + self.aux_loss(), lm_loss)
        logits = self.logits(hidden)
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
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """`idx` (batch, time) continued by `max_new_tokens` sampled ids; temperature 0 takes the argmax.

        With the KV cache a step runs only the new token. Past `seq_len` tokens the learned positions
        no longer fit, so from there each step reruns the last `seq_len` tokens (as nanoGPT crops).
        Padded vocabulary ids are never drawn.
        """
        cache = None
        for _ in range(max_new_tokens):
            logits, cache = self._next_logits(idx, cache, use_cache)
            next_id = sample_next(logits[:, : self.spec.vocab_size], temperature, top_k, generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx

    def _next_logits(self, idx: torch.Tensor, cache: KVCache | None,
                     use_cache: bool) -> tuple[torch.Tensor, KVCache | None]:
        """Logits for the position after `idx`, and the cache for the next step (None once the window slides)."""
        # Through self(...), not the layers directly, so FSDP's hooks gather the sharded weights.
        if not use_cache or idx.shape[1] > self.spec.seq_len:
            return self(idx[:, -self.spec.seq_len:]).logits[:, -1], None
        if cache is None:
            cache = KVCache(len(self.blocks), self.spec.seq_len)
        return self(idx[:, cache.length:], cache=cache).logits[:, -1], cache


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token among the real tokens of its row (padding gets 0)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """(batch, 1) ids: the argmax at temperature 0, else a draw from the top-k of softmax(logits / temperature)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
