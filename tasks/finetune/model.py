"""A pretrained encoder with a task head: classification, regression, multiple choice, span or tagging.

    pooled  = BERT: tanh(W h_[CLS]) (the pretrained pooler)     GPT: h_extract (the last real token)
    logits  = W_head dropout(sum over the example's sequences of pooled)      (classify, regress)
            = W_head dropout(pooled) per sequence, one score per answer       (choice)
            = W_head dropout(h) per token: (start, end) or the tags          (span, tag)
    loss    = L_task + lm_weight * L_LM                     (GPT-1's auxiliary LM objective, GPT only)

`HeadSpec` (saved as `head.json` beside the weights) says everything a reader needs to rebuild the
head; the encoder's shape is the `ModelSpec` in `config.json`.
"""
from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from storage.formats import FileModel, ModelSpec
from tasks.finetune.encode import IGNORE

HeadKind = Literal["classify", "regress", "choice", "span", "tag"]
NEG_INF = -1e4                 # masks padding out of the span softmax (finite: bf16-safe)


class HeadSpec(FileModel):
    """`head.json`: the task head and how the task's inputs were laid out."""

    task: str
    kind: HeadKind
    family: Literal["gpt", "bert"]
    n_outputs: int
    labels: list[Any] = []
    form: str                               # single, pair, similarity, qa, tagging
    max_length: int
    lm_weight: float = 0.0
    task_tokens: dict[str, int] = {}       # start, delim, extract (GPT) or [CLS], [SEP], [PAD] (BERT)
    pad_id: int
    init: Literal["pretrained", "random"]


class TaskOutput(NamedTuple):
    logits: torch.Tensor
    loss: torch.Tensor | None          # what backward() sees
    task_loss: torch.Tensor | None     # the task's own loss (logged, validated)


class TaskModel(nn.Module):
    def __init__(self, encoder: nn.Module, head: HeadSpec, dropout: float) -> None:
        super().__init__()
        self.encoder, self.head_spec = encoder, head
        width = encoder.spec.d_model
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, 1 if head.kind == "choice" else head.n_outputs)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("lm_excluded", torch.tensor(sorted(head.task_tokens.values()), dtype=torch.long),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, segment_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> TaskOutput:
        """`input_ids` (batch, sequences, time); labels per `HeadSpec.kind`."""
        batch, n_seq, time = input_ids.shape
        ids, mask = input_ids.view(-1, time), attention_mask.view(-1, time)
        segments = segment_ids.view(-1, time) if segment_ids is not None else None
        hidden = self.encoder.hidden_states(ids, segments, None if bool(mask.all()) else mask)
        logits = self.task_logits(hidden, mask, batch, n_seq)
        if labels is None:
            return TaskOutput(logits, None, None)
        task_loss = self.task_loss(logits, labels)
        loss = task_loss
        if self.head_spec.lm_weight > 0:
            loss = loss + self.head_spec.lm_weight * self.lm_loss(hidden, ids, mask)
        return TaskOutput(logits, loss, task_loss)

    def pooled(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One vector per sequence: BERT's pooler on [CLS], or GPT's last real token (extract)."""
        if self.head_spec.family == "bert":
            return torch.tanh(self.encoder.pooler(hidden[:, 0]))
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def task_logits(self, hidden: torch.Tensor, mask: torch.Tensor, batch: int, n_seq: int) -> torch.Tensor:
        kind = self.head_spec.kind
        if kind in ("span", "tag"):
            logits = self.head(self.drop(hidden))                       # (batch, time, outputs)
            if kind == "span":
                logits = logits.masked_fill(~mask.bool()[..., None], NEG_INF)
            return logits
        pooled = self.pooled(hidden, mask).view(batch, n_seq, -1)
        if kind == "choice":
            return self.head(self.drop(pooled)).squeeze(-1)             # (batch, answers)
        return self.head(self.drop(pooled.sum(dim=1)))                  # similarity: both orders summed

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        kind = self.head_spec.kind
        if kind == "regress":
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        if kind == "span":
            start, end = logits.float().unbind(dim=-1)
            return (F.cross_entropy(start, labels[:, 0]) + F.cross_entropy(end, labels[:, 1])) / 2
        if kind == "tag":
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        return F.cross_entropy(logits.float(), labels)

    def lm_loss(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy over the real tokens of the inputs (task tokens are never targets)."""
        targets = ids[:, 1:].masked_fill(~mask[:, 1:].bool() | torch.isin(ids[:, 1:], self.lm_excluded), IGNORE)
        logits = self.encoder.logits(hidden[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def head_kind(form: str, regression: bool) -> HeadKind:
    return {"qa": "span", "tagging": "tag", "choice": "choice"}.get(form, "regress" if regression else "classify")


def encoder_of(model: nn.Module) -> nn.Module:
    """The part with `hidden_states`: GPT itself (its LM head serves the auxiliary loss), BERT's `BertModel`."""
    return model.bert if hasattr(model, "bert") else model


def spec_for_finetuning(spec: ModelSpec, dropout: float, extra_rows: int) -> ModelSpec:
    """The pretrained shape with fine-tuning dropout and `extra_rows` more embedding rows (new task tokens)."""
    return spec.model_copy(update={"dropout": dropout, "padded_vocab_size": spec.padded_vocab_size + extra_rows})
