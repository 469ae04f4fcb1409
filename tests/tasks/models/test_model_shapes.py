"""Parameters: GPT-2 initialisation, tied embeddings, honest counts, and the bias knob on both architectures."""
from __future__ import annotations

import math

import pytest
import torch
from nanospecs import gpt_spec, spec_for

from tasks.models import GPT, build_model, count_params


def test_gpt_residual_projections_use_scaled_init_and_embeddings_are_tied() -> None:
    torch.manual_seed(0)
    spec = gpt_spec(n_layer=4, d_model=768, n_head=12, d_mlp=3072, vocab_size=50257, padded_vocab_size=50304)
    model = GPT(spec)
    assert abs(model.blocks[0].attn.proj.weight.std().item() - 0.02 / math.sqrt(8)) < 1e-3
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 1e-3
    assert "lm_head.weight" not in model.state_dict()      # the output layer is the embedding


def test_parameter_counts_leave_out_the_vocabulary_padding() -> None:
    spec = gpt_spec()
    assert count_params(GPT(spec), spec) == 120960
    padded = gpt_spec(padded_vocab_size=512)
    assert count_params(GPT(padded), padded) == 120960


def train_briefly(spec, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """Three AdamW steps on fixed data; returns the model and its output on held-out ids."""
    torch.manual_seed(seed)
    model = build_model(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 256, (4, 32), generator=data)
        loss = model(ids, torch.roll(ids, -1, 1)).loss if spec.arch == "gpt" else \
            model(ids, torch.zeros_like(ids), ids, nsp_labels=torch.zeros(4, dtype=torch.long)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), model.hidden_states(torch.randint(0, 256, (2, 16), generator=data))


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_bias_false_drops_every_bias_and_changes_the_model(arch: str) -> None:
    with_bias, without = spec_for(arch), spec_for(arch, bias=False)
    biased, biased_out = train_briefly(with_bias)
    plain, plain_out = train_briefly(without)
    bias_names = [name for name, _ in biased.named_parameters() if "bias" in name]
    assert len(bias_names) > 4 * with_bias.n_layer               # every Linear and LayerNorm has one
    assert not [name for name, _ in plain.named_parameters() if "bias" in name]
    bias_params = sum(p.numel() for name, p in biased.named_parameters() if "bias" in name)
    padding = (with_bias.padded_vocab_size - with_bias.vocab_size) if arch == "bert" else 0   # BERT's decoder bias
    assert count_params(biased, with_bias) - count_params(plain, without) == bias_params - padding
    assert not torch.allclose(biased_out, plain_out, atol=1e-3)   # trained biases move the outputs
