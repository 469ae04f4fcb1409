"""A mixture-of-experts MLP: top-k routing over GELU experts with a Switch-style balancing loss.

Every expert runs on every step, even on zero tokens, so each has a gradient and DDP never sees an
unused parameter. The balancing loss (Fedus et al. 2021) is n_experts * sum_e f_e * P_e, where f_e
is the share of routed slots that went to expert e and P_e its mean router probability; it is 1.0
when the load is perfectly even.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from storage.formats import ModelSpec
from tasks.models.layers import MLP


class MoE(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.top_k = spec.top_k
        self.router = nn.Linear(spec.d_model, spec.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(spec.d_model, spec.d_mlp, spec.bias) for _ in range(spec.n_experts))
        self.balance_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.router(flat).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(flat.dtype)
        out = torch.zeros_like(flat)
        for index, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == index)
            expert_out = expert(flat[rows]) * weights[rows, slot].unsqueeze(-1)
            out = out.index_add(0, rows, expert_out.to(out.dtype))
        self.balance_loss = self._balance_loss(probs, chosen)
        return out.view_as(x)

    def _balance_loss(self, probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        n_experts = probs.shape[-1]
        routed_share = F.one_hot(chosen, n_experts).float().sum(dim=1).mean(dim=0) / self.top_k
        return n_experts * (routed_share * probs.mean(dim=0)).sum()
