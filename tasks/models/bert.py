"""BERT: a bidirectional encoder trained by masked-LM (and optionally next-sentence prediction).

Token + position + segment embeddings; the original post-LayerNorm block (pre-LN as an option);
a masked-LM head whose decoder is tied to the word embedding; a next-sentence head on the pooled
`[CLS]` state. `BertForPretraining.bert` is exactly the released `BertModel` (pooler included), so
its parameter count matches the published one. `bias=False` drops every Linear and LayerNorm bias
(and the decoder's), as GPT does. Inputs are right-padded: `[CLS]` first, positions count from 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import fused_linear_cross_entropy
from storage.formats import ModelSpec
from tasks.models.layers import ModelOutput, SelfAttention, init_weights

IGNORE = -100


class EncoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.pre_norm = spec.norm == "pre"
        self.attn = SelfAttention(spec, causal=False)
        self.ln1 = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps, bias=spec.bias)
        self.fc = nn.Linear(spec.d_model, spec.d_mlp, bias=spec.bias)
        self.proj = nn.Linear(spec.d_mlp, spec.d_model, bias=spec.bias)
        self.ln2 = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps, bias=spec.bias)
        self.drop = nn.Dropout(spec.dropout)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.ln1(x), mask))
            return x + self.drop(self.mlp(self.ln2(x)))
        x = self.ln1(x + self.drop(self.attn(x, mask)))
        return self.ln2(x + self.drop(self.mlp(x)))


class BertModel(nn.Module):
    """Embeddings, encoder layers, and the tanh pooler over [CLS]."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.word = nn.Embedding(spec.padded_vocab_size, spec.d_model)
        self.position = nn.Embedding(spec.seq_len, spec.d_model)
        self.segment = nn.Embedding(spec.type_vocab_size, spec.d_model)
        self.ln_emb = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps, bias=spec.bias)
        self.drop = nn.Dropout(spec.dropout)
        self.layers = nn.ModuleList(EncoderLayer(spec) for _ in range(spec.n_layer))
        norm = spec.norm == "pre"
        self.ln_f = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps, bias=spec.bias) if norm else None
        self.pooler = nn.Linear(spec.d_model, spec.d_model, bias=spec.bias)

    def hidden_states(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, time, d_model); `attention_mask` is 1 for real tokens, `segment_ids` default to sentence A."""
        segment_ids = torch.zeros_like(input_ids) if segment_ids is None else segment_ids
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.segment(segment_ids)
        x = self.drop(self.ln_emb(x))
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]   # keys only
        for layer in self.layers:
            x = layer(x, mask)
        return x if self.ln_f is None else self.ln_f(x)

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (batch, time, width) and the pooled [CLS] vector (batch, width)."""
        hidden = self.hidden_states(input_ids, segment_ids, attention_mask)
        return hidden, torch.tanh(self.pooler(hidden[:, 0]))


class BertForPretraining(nn.Module):
    # True: the MLM loss comes from `kernels.fused_linear_cross_entropy`, no logits (the pretrain recipe's
    # kernels.fused_ce sets it; not part of the model, so not in its spec).
    fused_ce = False

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.bert = BertModel(spec)
        self.mlm_dense = nn.Linear(spec.d_model, spec.d_model, bias=spec.bias)
        self.mlm_ln = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps, bias=spec.bias)
        self.mlm_bias = nn.Parameter(torch.zeros(spec.padded_vocab_size)) if spec.bias else None
        self.nsp_head = nn.Linear(spec.d_model, 2, bias=spec.bias) if spec.nsp else None
        self.apply(init_weights)

    def hidden_states(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.bert.hidden_states(input_ids, segment_ids, attention_mask)

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor, mlm_labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None, nsp_labels: torch.Tensor | None = None) -> ModelOutput:
        """MLM loss over the positions whose label is not -100 (plus the NSP loss when enabled)."""
        hidden, pooled = self.bert(input_ids, segment_ids, attention_mask)
        masked = mlm_labels != IGNORE
        labels = mlm_labels[masked]
        if self.fused_ce:
            logits, mlm_loss = None, self.fused_mlm_loss(hidden[masked], labels)
        else:
            logits = self.mlm_logits(hidden[masked])
            # A sum over a count of at least one: a batch with nothing masked gives 0, not NaN.
            mlm_loss = F.cross_entropy(logits, labels, reduction="sum") / labels.numel() if labels.numel() else \
                logits.sum() * 0.0
        loss = mlm_loss
        if self.nsp_head is not None and nsp_labels is not None:
            loss = loss + F.cross_entropy(self.nsp_head(pooled), nsp_labels)
        return ModelOutput(logits, loss, mlm_loss)

    def fused_mlm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The same transform and tied decoder as `mlm_logits`, scored without forming the logits."""
        h = self.mlm_ln(F.gelu(self.mlm_dense(hidden)))
        total = fused_linear_cross_entropy(h, self.bert.word.weight, labels, bias=self.mlm_bias, reduction="sum")
        return total / max(labels.numel(), 1)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Transform, then decode with the word embedding (tied) plus a bias."""
        h = self.mlm_ln(F.gelu(self.mlm_dense(hidden)))
        return F.linear(h, self.bert.word.weight, self.mlm_bias)
