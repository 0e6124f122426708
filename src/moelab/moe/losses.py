"""Auxiliary losses, each a function of a Routing plan (definitions in shared EQUATIONS.md)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from moelab.moe.routing import Routing


def balance_loss(plan: Routing) -> Tensor:
    """Load-balancing loss (Switch, Fedus et al. 2021, eq. 4; GShard, Lepikhin et al. 2020).

    L = E · Σ_i f_i · P_i with f_i = c_i / (k·T), c_i the assignments to expert i counted
    before capacity drops, and P_i = (1/T) Σ_t p_t,i. Dividing by k makes L = 1 at
    perfectly uniform routing for every k.
    """
    num_experts, num_tokens, top_k = plan.num_experts, plan.num_tokens, plan.top_k
    counts_E = torch.zeros(num_experts, device=plan.router_probs_TE.device)
    counts_E.scatter_add_(0, plan.selected_experts_TK.reshape(-1), torch.ones(num_tokens * top_k, device=counts_E.device))
    fraction_E = counts_E / (num_tokens * top_k)
    mean_prob_E = plan.router_probs_TE.mean(dim=0)
    return num_experts * torch.dot(fraction_E, mean_prob_E)


def z_loss(plan: Routing) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): L = (1/T) Σ_t (log Σ_i exp h_t,i)²."""
    return torch.logsumexp(plan.router_logits_TE, dim=-1).square().mean()


AUX_LOSSES: dict[str, Callable[[Routing], Tensor]] = {
    "balance": balance_loss,
    "zloss": z_loss,
}
