"""The learning-rate schedule and AdamW's parameter groups."""
from __future__ import annotations

import pytest
import torch

from tasks.training.config import OptimConfig
from tasks.training.optim import lr_at, optimizer_groups


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    optim = OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10)
    lrs = [lr_at(step, optim, 100) for step in range(1, 101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4)
    linear = OptimConfig(lr=1e-3, min_lr_ratio=0.0, warmup_steps=0, decay="linear")
    assert lr_at(50, linear, 100) == pytest.approx(5e-4)


def test_weight_decay_skips_biases_and_norm_gains() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decayed, plain = optimizer_groups(model, 0.1)
    assert [p.shape for p in decayed["params"]] == [(4, 4)] and decayed["weight_decay"] == 0.1
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0
