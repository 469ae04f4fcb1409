"""BERT: a bidirectional encoder trained by masked-LM (and optionally next-sentence prediction).

Token + position + segment embeddings; the original post-LayerNorm block (pre-LN as an option);
a masked-LM head whose decoder is tied to the word embedding; a next-sentence head on the pooled
`[CLS]` state. `BertForPretraining.bert` is exactly the released `BertModel` (pooler included), so
its parameter count matches the published one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.pretrain.config import ModelSpec
from tasks.pretrain.gpt import INIT_STD, ModelOutput, split_heads

IGNORE = -100


class SelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.n_head, self.dropout = spec.n_head, spec.dropout
        self.qkv = nn.Linear(spec.d_model, 3 * spec.d_model)
        self.proj = nn.Linear(spec.d_model, spec.d_model)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """`keep` (batch, time) is True for real tokens; None means no padding in the batch."""
        batch, seq, width = x.shape
        q, k, v = split_heads(self.qkv(x), self.n_head)
        mask = None if keep is None else keep[:, None, None, :]
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))


class EncoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.pre_norm = spec.norm == "pre"
        self.attn = SelfAttention(spec)
        self.ln1 = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps)
        self.fc = nn.Linear(spec.d_model, spec.d_mlp)
        self.proj = nn.Linear(spec.d_mlp, spec.d_model)
        self.ln2 = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps)
        self.drop = nn.Dropout(spec.dropout)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.ln1(x), keep))
            return x + self.drop(self.mlp(self.ln2(x)))
        x = self.ln1(x + self.drop(self.attn(x, keep)))
        return self.ln2(x + self.drop(self.mlp(x)))


class BertModel(nn.Module):
    """Embeddings, encoder layers, and the tanh pooler over [CLS]."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.word = nn.Embedding(spec.padded_vocab_size, spec.d_model)
        self.position = nn.Embedding(spec.seq_len, spec.d_model)
        self.segment = nn.Embedding(spec.type_vocab_size, spec.d_model)
        self.ln_emb = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps)
        self.drop = nn.Dropout(spec.dropout)
        self.layers = nn.ModuleList(EncoderLayer(spec) for _ in range(spec.n_layer))
        self.ln_f = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps) if spec.norm == "pre" else None
        self.pooler = nn.Linear(spec.d_model, spec.d_model)

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (batch, time, width) and the pooled [CLS] vector (batch, width)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.segment(segment_ids)
        x = self.drop(self.ln_emb(x))
        for layer in self.layers:
            x = layer(x, keep)
        if self.ln_f is not None:
            x = self.ln_f(x)
        return x, torch.tanh(self.pooler(x[:, 0]))


class BertForPretraining(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.bert = BertModel(spec)
        self.mlm_dense = nn.Linear(spec.d_model, spec.d_model)
        self.mlm_ln = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(spec.padded_vocab_size))
        self.nsp_head = nn.Linear(spec.d_model, 2) if spec.nsp else None
        self.apply(_init_weights)

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor, mlm_labels: torch.Tensor,
                keep: torch.Tensor | None = None, nsp_labels: torch.Tensor | None = None) -> ModelOutput:
        """MLM loss over the positions whose label is not -100 (plus the NSP loss when enabled)."""
        hidden, pooled = self.bert(input_ids, segment_ids, keep)
        masked = mlm_labels != IGNORE
        logits = self.mlm_logits(hidden[masked])
        labels = mlm_labels[masked]
        # A sum over a count of at least one: a batch with nothing masked gives 0, not NaN.
        mlm_loss = F.cross_entropy(logits, labels, reduction="sum") / labels.numel() if labels.numel() else \
            logits.sum() * 0.0
        loss = mlm_loss
        if self.nsp_head is not None and nsp_labels is not None:
            loss = loss + F.cross_entropy(self.nsp_head(pooled), nsp_labels)
        return ModelOutput(logits, loss, mlm_loss)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Transform, then decode with the word embedding (tied) plus a bias."""
        h = self.mlm_ln(F.gelu(self.mlm_dense(hidden)))
        return F.linear(h, self.bert.word.weight, self.mlm_bias)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
