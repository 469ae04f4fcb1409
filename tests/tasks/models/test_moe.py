"""The mixture-of-experts MLP: routing, the balancing loss, and what it costs."""
from __future__ import annotations

import torch
from nanospecs import gpt_spec

from tasks.models import GPT, count_params, flops_per_token


def test_mixture_of_experts_routes_and_balances() -> None:
    torch.manual_seed(0)
    spec = gpt_spec(n_experts=4, top_k=2)
    model = GPT(spec)
    idx = torch.randint(0, 256, (4, 32))
    out = model(idx, idx)
    out.loss.backward()
    balance = model.blocks[0].mlp.balance_loss.item()
    assert 1.0 <= balance < 1.5                          # ~1 when the load is even
    assert out.loss.item() > out.lm_loss.item()
    assert all(e.fc.weight.grad is not None for e in model.blocks[0].mlp.experts)
    dense = gpt_spec()
    assert flops_per_token(model, spec) < 2 * flops_per_token(GPT(dense), dense)   # top-2 of 4 experts
    assert count_params(model, spec) > count_params(GPT(dense), dense)
