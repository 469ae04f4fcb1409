"""Tiny model shapes for the model tests (gpt-nano / bert-nano over a 262-id byte vocabulary)."""
from __future__ import annotations

from storage.formats import ModelSpec

GPT_IDS = {"<|endoftext|>": 256}
BERT_IDS = {"[CLS]": 257, "[SEP]": 258, "[MASK]": 259, "[PAD]": 260, "[UNK]": 261}
SHAPE = dict(n_layer=2, n_head=2, d_model=64, d_mlp=256, seq_len=64, vocab_size=262, padded_vocab_size=384)


def gpt_spec(**overrides: object) -> ModelSpec:
    return ModelSpec(**{"arch": "gpt", **SHAPE, "special_tokens": GPT_IDS, **overrides})


def bert_spec(**overrides: object) -> ModelSpec:
    fields = {"arch": "bert", **SHAPE, "norm": "post", "layer_norm_eps": 1e-12, "nsp": True,
              "special_tokens": BERT_IDS}
    return ModelSpec(**{**fields, **overrides})


def spec_for(arch: str, **overrides: object) -> ModelSpec:
    return gpt_spec(**overrides) if arch == "gpt" else bert_spec(**overrides)
