"""The models pretrain trains and finetune, evaluate and export load: GPT, BERT, their shared layers, MoE.

    model, spec = load_pretrained(pretrain_output, "cuda", tokenizer_dir)    # weights + config.json
    hidden = model.hidden_states(input_ids, attention_mask=mask)           # [B, T, d] (the Encoder protocol)

Every architecture satisfies `Encoder`: a task head (a classifier, a span scorer) sits on
`hidden_states` and needs to know nothing else about the model.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from storage.formats import ModelSpec
from tasks.models.bert import IGNORE, BertForPretraining, BertModel
from tasks.models.files import CONFIG_FILE, MODEL_FILE
from tasks.models.gpt import GPT
from tasks.models.layers import ModelOutput
from tasks.models.pretrained import PretrainedModelError, load_pretrained
from tasks.models.registry import ARCHITECTURES, build_model, count_params, flops_per_token


@runtime_checkable
class Encoder(Protocol):
    """A model that maps token ids to one vector per position.

    `attention_mask` (batch, time) is 1 for real tokens and 0 for padding; the hidden states of real
    tokens do not depend on the padding. GPT attends causally and accepts padding on either side; BERT
    attends both ways, expects right padding, and reads `segment_ids` (default: all sentence A); GPT
    has no segments and rejects them.
    """

    spec: ModelSpec

    def hidden_states(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, time, spec.d_model)."""
        ...


__all__ = ["ARCHITECTURES", "CONFIG_FILE", "GPT", "IGNORE", "MODEL_FILE", "BertForPretraining", "BertModel",
           "Encoder", "ModelOutput", "ModelSpec", "PretrainedModelError", "build_model", "count_params",
           "flops_per_token", "load_pretrained"]
