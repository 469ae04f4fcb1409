"""Export to the Hugging Face layout: a folder `transformers` loads with no custom code, written without transformers.

    GPT  -> GPT2LMHeadModel     exact GELU ("gelu"), tied embeddings, learned positions, pre-LayerNorm
    BERT -> BertForPreTraining  (with the next-sentence head) or BertForMaskedLM (without it), post-LayerNorm

The folder holds `model.safetensors` (HF's parameter names and layouts: GPT-2's Conv1D weights are
stored (in, out), the transpose of a Linear's), `config.json`, `generation_config.json` (GPT), and the
tokenizer as `tokenizer.json` + `tokenizer_config.json` + `special_tokens_map.json` for
`PreTrainedTokenizerFast`. Only the real vocabulary is exported (the embedding's padding rows are
dropped), so the HF model's softmax runs over exactly the ids the tokenizer can produce. A model
without biases gets zero biases, which computes the same function. What HF's classes cannot express
(a mixture of experts, a pre-LayerNorm BERT) is refused with the reason.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from tokenizers import processors

from storage.formats import ModelSpec
from storage.stage import StageError
from tasks.export.source import ModelSource
from tasks.models.files import MODEL_FILE
from tasks.tokenizer.files import read_vocabulary
from tasks.tokenizer.hf import hf_tokenizer

EOT = "<|endoftext|>"
BERT_SPECIALS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]", "pad_token": "[PAD]",
                 "unk_token": "[UNK]"}


FINETUNED_BERT = ("it is a fine-tuned BERT task model: its encoder has no masked-LM head and its task head "
                  "(head.json) no HF class here; export the pretrain output it was fine-tuned from")


class ExportError(StageError):
    """A model HF's classes cannot express, or an output folder that cannot be written; the message says why."""


def export_hf(source: ModelSource, out: Path | str) -> Path:
    """Writes the HF folder at `out` (new or empty), through a temporary sibling renamed into place."""
    spec, out = source.spec, Path(out)
    refusal = unsupported(spec) or (source.finetuned and spec.arch == "bert" and FINETUNED_BERT)
    if refusal:
        raise ExportError(f"{source.model_dir}: cannot export to Hugging Face format: {refusal}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder; choose a new output folder")
    weights = source.weights()
    tensors = gpt_tensors(weights, spec) if spec.arch == "gpt" else bert_tensors(weights, spec)
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    try:
        _write_folder(tmp, tensors, spec, source.tokenizer_dir)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def unsupported(spec: ModelSpec) -> str | None:
    """Why HF's GPT-2 / BERT classes cannot hold this model, or None."""
    if spec.n_experts:
        return (f"it has a mixture-of-experts MLP ({spec.n_experts} experts, top-{spec.top_k}); "
                "GPT2LMHeadModel has one dense MLP per block")
    if spec.arch == "gpt" and spec.norm != "pre":
        return f"norm={spec.norm!r}: GPT-2 blocks are pre-LayerNorm"
    if spec.arch == "bert" and spec.norm != "post":
        return f"norm={spec.norm!r}: HF's BertModel is post-LayerNorm only (the original BERT)"
    return None


def _write_folder(folder: Path, tensors: dict[str, torch.Tensor], spec: ModelSpec, tokenizer_dir: Path) -> None:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, folder / MODEL_FILE,
                                metadata={"format": "pt"})
    _json(folder / "config.json", gpt_config(spec) if spec.arch == "gpt" else bert_config(spec))
    if spec.arch == "gpt":
        _json(folder / "generation_config.json", generation_config(spec))
    write_tokenizer(folder, spec, tokenizer_dir)


def _json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---- GPT -> GPT2LMHeadModel -----------------------------------------------------------------


def gpt_tensors(weights: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """lmforge GPT weights under GPT-2's names; Linear weights transposed into Conv1D's (in, out)."""
    get = _getter(weights)
    out = {"transformer.wte.weight": get("wte.weight")[: spec.vocab_size], "transformer.wpe.weight": get("wpe.weight")}
    for i in range(spec.n_layer):
        ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
        for a, b in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out |= _layer_norm(get, f"{ours}.{a}", f"{theirs}.{b}", spec.d_model)
        for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                     ("mlp.proj", "mlp.c_proj")):
            weight = get(f"{ours}.{a}.weight")
            out[f"{theirs}.{b}.weight"] = weight.t()
            out[f"{theirs}.{b}.bias"] = get(f"{ours}.{a}.bias", weight.shape[0])
    return out | _layer_norm(get, "ln_f", "transformer.ln_f", spec.d_model)


def gpt_config(spec: ModelSpec) -> dict[str, Any]:
    eot = spec.special_tokens[EOT]
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": spec.vocab_size,
            "n_positions": spec.seq_len, "n_embd": spec.d_model, "n_layer": spec.n_layer, "n_head": spec.n_head,
            "n_inner": spec.d_mlp, "activation_function": "gelu",   # exact (erf) GELU, as lmforge's MLP
            "resid_pdrop": spec.dropout, "embd_pdrop": spec.dropout, "attn_pdrop": spec.dropout,
            "layer_norm_epsilon": spec.layer_norm_eps, "initializer_range": 0.02, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "use_cache": True,
            "tie_word_embeddings": True, "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32"}


def generation_config(spec: ModelSpec) -> dict[str, Any]:
    eot = spec.special_tokens[EOT]
    # Batched generation pads with end-of-text, as GPT-2 users do (GPT-2 has no pad token).
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}


# ---- BERT -> BertForPreTraining / BertForMaskedLM -------------------------------------------


def bert_tensors(weights: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """lmforge BERT weights under HF's names; the fused q/k/v projection split into query, key, value."""
    get, d = _getter(weights), spec.d_model
    out = {"bert.embeddings.word_embeddings.weight": get("bert.word.weight")[: spec.vocab_size],
           "bert.embeddings.position_embeddings.weight": get("bert.position.weight"),
           "bert.embeddings.token_type_embeddings.weight": get("bert.segment.weight")}
    out |= _layer_norm(get, "bert.ln_emb", "bert.embeddings.LayerNorm", d)
    for i in range(spec.n_layer):
        out |= _bert_layer(get, f"bert.layers.{i}", f"bert.encoder.layer.{i}", spec)
    out |= _linear(get, "mlm_dense", "cls.predictions.transform.dense", d)
    out |= _layer_norm(get, "mlm_ln", "cls.predictions.transform.LayerNorm", d)
    out["cls.predictions.bias"] = get("mlm_bias", spec.padded_vocab_size)[: spec.vocab_size]
    if spec.nsp:
        out |= _linear(get, "bert.pooler", "bert.pooler.dense", d)
        out |= _linear(get, "nsp_head", "cls.seq_relationship", 2)
    return out


def _bert_layer(get, ours: str, theirs: str, spec: ModelSpec) -> dict[str, torch.Tensor]:
    d = spec.d_model
    qkv_weight, qkv_bias = get(f"{ours}.attn.qkv.weight").split(d), get(f"{ours}.attn.qkv.bias", 3 * d).split(d)
    out = {}
    for name, weight, bias in zip(("query", "key", "value"), qkv_weight, qkv_bias):
        out[f"{theirs}.attention.self.{name}.weight"], out[f"{theirs}.attention.self.{name}.bias"] = weight, bias
    out |= _linear(get, f"{ours}.attn.proj", f"{theirs}.attention.output.dense", d)
    out |= _layer_norm(get, f"{ours}.ln1", f"{theirs}.attention.output.LayerNorm", d)
    out |= _linear(get, f"{ours}.fc", f"{theirs}.intermediate.dense", spec.d_mlp)
    out |= _linear(get, f"{ours}.proj", f"{theirs}.output.dense", d)
    return out | _layer_norm(get, f"{ours}.ln2", f"{theirs}.output.LayerNorm", d)


def bert_config(spec: ModelSpec) -> dict[str, Any]:
    architecture = "BertForPreTraining" if spec.nsp else "BertForMaskedLM"
    return {"architectures": [architecture], "model_type": "bert", "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "num_hidden_layers": spec.n_layer, "num_attention_heads": spec.n_head,
            "intermediate_size": spec.d_mlp, "hidden_act": "gelu", "hidden_dropout_prob": spec.dropout,
            "attention_probs_dropout_prob": spec.dropout, "max_position_embeddings": spec.seq_len,
            "type_vocab_size": spec.type_vocab_size, "initializer_range": 0.02,
            "layer_norm_eps": spec.layer_norm_eps, "pad_token_id": spec.special_tokens["[PAD]"],
            "position_embedding_type": "absolute", "tie_word_embeddings": True, "torch_dtype": "float32"}


# ---- shared pieces ----------------------------------------------------------------------------


def _getter(weights: dict[str, torch.Tensor]):
    """get(name) -> the tensor; get(name, size) -> the tensor, or zeros(size) where a bias=False model has none."""
    def get(name: str, size: int | None = None) -> torch.Tensor:
        if name in weights:
            return weights[name].float()
        if size is None:
            raise ExportError(f"the weights have no {name!r}; is this an lmforge model of the architecture "
                              "its config.json names?")
        return torch.zeros(size)
    return get


def _linear(get, ours: str, theirs: str, out_features: int) -> dict[str, torch.Tensor]:
    return {f"{theirs}.weight": get(f"{ours}.weight"), f"{theirs}.bias": get(f"{ours}.bias", out_features)}


def _layer_norm(get, ours: str, theirs: str, width: int) -> dict[str, torch.Tensor]:
    return {f"{theirs}.weight": get(f"{ours}.weight"), f"{theirs}.bias": get(f"{ours}.bias", width)}


# ---- tokenizer --------------------------------------------------------------------------------


def write_tokenizer(folder: Path, spec: ModelSpec, tokenizer_dir: Path) -> None:
    """tokenizer.json (same ids as tiktoken's encode_ordinary: plain text never becomes a special token),
    tokenizer_config.json, special_tokens_map.json."""
    vocab = read_vocabulary(tokenizer_dir)
    tokenizer = hf_tokenizer(vocab)
    if spec.arch == "bert":     # [CLS] A [SEP] (B [SEP]), as lmforge's BERT was trained
        cls, sep = spec.special_tokens["[CLS]"], spec.special_tokens["[SEP]"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer.save(str(folder / "tokenizer.json"), pretty=False)
    specials = BERT_SPECIALS if spec.arch == "bert" else {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    _json(folder / "special_tokens_map.json", specials)
    # split_special_tokens: a special token's name inside text is text (lmforge's encode_ordinary), never its id.
    _json(folder / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                             "model_max_length": spec.seq_len, "clean_up_tokenization_spaces": False,
                                             "add_prefix_space": False, "split_special_tokens": True, **specials})
