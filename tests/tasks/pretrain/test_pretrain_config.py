"""The pretrain recipe: presets, errors that name the field, and no knob that changes nothing."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from tasks.models import BertForPretraining, build_model
from tasks.pretrain.config import ModelConfig, PretrainConfig
from tasks.pretrain.presets import PRESETS

BERT = {"model": {"preset": "bert-nano"}}


def spec_for(preset: str, vocab: int, **overrides):
    return ModelConfig(preset=preset, **overrides).resolve(vocab, {"<|endoftext|>": vocab - 1})


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.published_params])
def test_preset_parameter_counts_match_published_figures(name: str) -> None:
    preset = PRESETS[name]
    spec = spec_for(name, preset.reference_vocab)
    with torch.device("meta"):                       # nothing is allocated, even for 1.5B
        model = build_model(spec)
    counted = model.bert if isinstance(model, BertForPretraining) else model   # BERT's figure is BertModel's
    padding = (spec.padded_vocab_size - spec.vocab_size) * spec.d_model
    params = sum(p.numel() for p in counted.parameters()) - padding
    assert spec.padded_vocab_size % 128 == 0 and spec.padded_vocab_size >= preset.reference_vocab
    if preset.params_tolerance == 0:
        assert params == preset.published_params
    else:
        assert abs(params - preset.published_params) <= preset.params_tolerance * preset.published_params


def test_presets_use_nice_sizes_and_explicit_fields_override() -> None:
    for name, preset in PRESETS.items():
        if name != "gpt2-1.5b":                          # 1600 / 25 heads: the released shape
            assert preset.d_model % 64 == 0 and preset.d_mlp % 64 == 0, name
        assert preset.d_model % preset.n_head == 0, name
    spec = spec_for("gpt2-124m", 1000, n_layer=3, seq_len=128)
    assert (spec.n_layer, spec.d_model, spec.seq_len, spec.padded_vocab_size) == (3, 768, 128, 1024)


def test_model_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="model.arch='bert' but model.preset='gpt-nano'"):
        ModelConfig(arch="bert", preset="gpt-nano")
    with pytest.raises(ValidationError, match="not divisible by model.n_head"):
        ModelConfig(preset="gpt-nano", n_head=3)
    with pytest.raises(ValidationError, match="unknown model preset 'gpt-9'"):
        ModelConfig(preset="gpt-9")
    with pytest.raises(ValidationError, match="exactly one of max_steps and max_tokens"):
        PretrainConfig(max_tokens=1000)
    with pytest.raises(ValidationError, match="extra"):
        PretrainConfig(model={"preset": "gpt-nano", "layers": 3})
    with pytest.raises(ValidationError, match="nnodes=2 needs rdzv_endpoint"):
        PretrainConfig(nnodes=2)
    with pytest.raises(ValidationError, match="sample.prompts: a prompt is empty"):
        PretrainConfig(sample={"prompts": ["The ", ""]})
    with pytest.raises(ValidationError, match="model.moe is a GPT option"):
        ModelConfig(preset="bert-nano", moe={"n_experts": 4})


DEAD_KNOBS = {  # the knob, the error it gets, and a config where it does act
    "mlm_probability on GPT": ({"mlm_probability": 0.2}, r"mlm_probability=0.2 is a BERT option", BERT),
    "nsp on GPT": ({"nsp": False}, "nsp=false is a BERT option", BERT),
    "moe.top_k without experts": ({"model": {"moe": {"top_k": 1}}}, r"model.moe.top_k=1 has no effect without",
                                  {"model": {"moe": {"n_experts": 4, "top_k": 1}}}),
    "moe.aux_loss_weight without experts": ({"model": {"moe": {"aux_loss_weight": 0.1}}},
                                            r"model.moe.aux_loss_weight=0.1 has no effect",
                                            {"model": {"moe": {"n_experts": 4, "aux_loss_weight": 0.1}}}),
    "fsdp on one process": ({"dist": "fsdp"}, "dist='fsdp' shards the model across processes", {"nproc_per_node": 2}),
}


@pytest.mark.parametrize("case", DEAD_KNOBS)
def test_knobs_this_run_cannot_use_are_rejected(case: str) -> None:
    fields, message, acting = DEAD_KNOBS[case]
    with pytest.raises(ValidationError, match=message):
        PretrainConfig.model_validate(fields)
    PretrainConfig.model_validate({**fields, **acting})                # where the knob acts, it is accepted


def fingerprint_fields(**fields: object) -> dict:
    return PretrainConfig.model_validate(fields).output_fields()


def test_knobs_whose_feature_is_off_stay_out_of_the_fingerprint() -> None:
    other_samples = {"sample": {"prompts": ["Once "], "max_new_tokens": 5}}
    assert fingerprint_fields(**BERT) == fingerprint_fields(**BERT, **other_samples)   # BERT writes no samples
    assert fingerprint_fields() != fingerprint_fields(**other_samples)                  # GPT does
    assert fingerprint_fields(eval_every=0) == fingerprint_fields(eval_every=0, eval_batches=9)
    assert fingerprint_fields() != fingerprint_fields(eval_batches=9)
    assert fingerprint_fields(checkpoint_every=0) == fingerprint_fields(checkpoint_every=0, keep_last=5)
    assert fingerprint_fields() != fingerprint_fields(keep_last=5)
    assert fingerprint_fields(**BERT) != fingerprint_fields(model={"preset": "bert-nano", "bias": False})


def test_recipes_validate_without_importing_torch() -> None:
    code = "import sys, tasks.pretrain, tasks.pretrain.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
