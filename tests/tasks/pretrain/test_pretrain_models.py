"""The models and objectives: preset sizes, causal masking, BERT masking statistics, MoE, the schedule."""
from __future__ import annotations

import math

import pytest
import shardfixture  # noqa: F401  (first: makes `tasks.pretrain` the real package, see there)
import torch
from pydantic import ValidationError

from tasks.pretrain.bert import IGNORE, BertForPretraining
from tasks.pretrain.config import ModelConfig, OptimConfig, PretrainConfig
from tasks.pretrain.gpt import GPT
from tasks.pretrain.objectives import Masker, build_model, count_params, flops_per_token, lr_at
from tasks.pretrain.presets import PRESETS

BERT_IDS = {"[CLS]": 257, "[SEP]": 258, "[MASK]": 259, "[PAD]": 260, "[UNK]": 261}


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


def test_gpt_is_causal_and_the_loss_starts_near_uniform() -> None:
    torch.manual_seed(0)
    spec = spec_for("gpt-nano", 262)
    model = GPT(spec).eval()
    idx = torch.randint(0, 256, (2, 32))
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 256          # change one future token
    before, after = model(idx).logits, model(changed).logits
    assert torch.equal(before[:, :20], after[:, :20])    # earlier positions cannot see it
    assert not torch.allclose(before[:, 20:], after[:, 20:])
    loss = model(idx, torch.randint(0, 256, (2, 32))).lm_loss
    assert abs(loss.item() - math.log(spec.padded_vocab_size)) < 0.2


def test_gpt_residual_projections_use_scaled_init_and_embeddings_are_tied() -> None:
    torch.manual_seed(0)
    spec = spec_for("gpt2-124m", 50257, n_layer=4, seq_len=64)
    model = GPT(spec)
    assert abs(model.blocks[0].attn.proj.weight.std().item() - 0.02 / math.sqrt(8)) < 1e-3
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 1e-3
    assert "lm_head.weight" not in model.state_dict()      # the output layer is the embedding


def test_generate_never_draws_padding_ids() -> None:
    torch.manual_seed(0)
    spec = spec_for("gpt-nano", 130)                      # padded to 256: ids 130..255 are padding
    model = GPT(spec).eval()
    with torch.no_grad():
        model.wte.weight[130:] = 50.0                    # padding rows would dominate the softmax
    out = model.generate(torch.zeros((3, 1), dtype=torch.long), 20, temperature=1.0, top_k=None,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 21) and int(out.max()) < 130


def test_bert_padding_does_not_leak_into_real_positions() -> None:
    torch.manual_seed(0)
    spec = ModelConfig(preset="bert-nano").resolve(262, BERT_IDS, nsp=True)
    model = BertForPretraining(spec).eval()
    ids = torch.randint(0, 256, (1, 16))
    ids[0, 10:] = BERT_IDS["[PAD]"]
    keep = ids != BERT_IDS["[PAD]"]
    other = ids.clone()
    other[0, 12] = 7                                     # garbage in a padded slot
    segments = torch.zeros_like(ids)
    hidden_a, _ = model.bert(ids, segments, keep)
    hidden_b, _ = model.bert(other, segments, keep)
    assert torch.allclose(hidden_a[:, :10], hidden_b[:, :10], atol=1e-6)
    labels = torch.full_like(ids, IGNORE)
    labels[0, 3] = int(ids[0, 3])
    out = model(ids, segments, labels, keep, torch.tensor([1]))
    assert out.loss.item() > out.lm_loss.item() > 0        # MLM plus NSP


def test_mlm_masking_statistics() -> None:
    spec = ModelConfig(preset="bert-nano").resolve(262, BERT_IDS)
    masker = Masker(spec, 0.15, seed=0)
    ids = torch.randint(0, 256, (64, 512))
    ids[:, 0], ids[:, 255], ids[:, 400:] = BERT_IDS["[CLS]"], BERT_IDS["[SEP]"], BERT_IDS["[PAD]"]
    corrupted, labels = masker(ids)
    special = torch.isin(ids, torch.tensor(list(BERT_IDS.values())))
    chosen = labels != IGNORE
    assert not (chosen & special).any()                  # specials are never masked
    assert torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen.sum().item() / (~special).sum().item() - 0.15) < 0.005
    as_mask = (corrupted == BERT_IDS["[MASK]"])[chosen].float().mean().item()
    unchanged = (corrupted == ids)[chosen].float().mean().item()
    assert abs(as_mask - 0.8) < 0.01
    assert abs(unchanged - 0.1 - 0.1 / 256) < 0.01         # 10% kept, plus random draws of the same id
    random = corrupted[chosen & (corrupted != ids) & (corrupted != BERT_IDS["[MASK]"])]
    assert not torch.isin(random, torch.tensor(list(BERT_IDS.values()))).any()   # only regular tokens
    assert torch.equal(corrupted[~chosen], ids[~chosen])
    again, _ = masker(ids)
    assert not torch.equal(again, corrupted)             # drawn afresh for every batch


def test_mixture_of_experts_routes_and_balances() -> None:
    torch.manual_seed(0)
    spec = spec_for("gpt-nano", 262, moe={"n_experts": 4, "top_k": 2})
    model = GPT(spec)
    idx = torch.randint(0, 256, (4, 32))
    out = model(idx, idx)
    out.loss.backward()
    balance = model.blocks[0].mlp.balance_loss.item()
    assert 1.0 <= balance < 1.5                          # ~1 when the load is even
    assert out.loss.item() > out.lm_loss.item()
    assert all(e.fc.weight.grad is not None for e in model.blocks[0].mlp.experts)
    dense = spec_for("gpt-nano", 262)
    assert flops_per_token(model, spec) < 2 * flops_per_token(GPT(dense), dense)   # top-2 of 4 experts
    assert count_params(model, spec) > count_params(GPT(dense), dense)


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    optim = OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10)
    lrs = [lr_at(step, optim, 100) for step in range(1, 101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4)
    linear = OptimConfig(lr=1e-3, min_lr_ratio=0.0, warmup_steps=0, decay="linear")
    assert lr_at(50, linear, 100) == pytest.approx(5e-4)
