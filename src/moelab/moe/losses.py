"""Auxiliary losses, each a function of a routing plan (definitions: docs/equations.md).

Which losses mean something for which router is declared by the router
(`supported_losses`); MoELayer skips, with a warning, a weighted loss its router lacks.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from moelab.moe.errors import ConfigError
from moelab.moe.routing import Routing, mean_entropy


def _assignment_counts(selected_TK: Tensor, num_experts: int) -> Tensor:
    counts_E = torch.zeros(num_experts, device=selected_TK.device)
    return counts_E.scatter_add_(0, selected_TK.reshape(-1), torch.ones(selected_TK.numel(), device=selected_TK.device))


def _cv_squared(values_E: Tensor) -> Tensor:
    """Squared coefficient of variation, population std: (std / mean)²."""
    return values_E.var(unbiased=False) / values_E.mean().square().clamp_min(1e-10)


def balance_loss(plan: Routing) -> Tensor:
    """Load-balancing loss (Switch, Fedus et al. 2021, eq. 4; GShard, Lepikhin et al. 2020).

    L = E · Σ_i f_i · P_i with f_i = c_i / (k·T), c_i the assignments to expert i counted
    before capacity drops, and P_i = (1/T) Σ_t p_t,i. Dividing by k makes L = 1 at
    perfectly uniform routing for every k. Every choice counts, GShard's second one
    included, where GShard's Algorithm 1 counts the first choice only.
    """
    fraction_E = _assignment_counts(plan.selected_experts_TK, plan.num_experts) / plan.selected_experts_TK.numel()
    return plan.num_experts * torch.dot(fraction_E, plan.router_probs_TE.mean(dim=0))


def seq_balance_loss(plan: Routing) -> Tensor:
    """Sequence-wise balance loss (DeepSeek-V3, Liu et al. 2024, eqs. 17-20): the balance
    loss with f and P computed over each sequence's tokens, averaged over sequences."""
    context = plan.context
    num_sequences = 1 if context is None else context.num_sequences
    num_experts = plan.num_experts
    selected_BLK = plan.selected_experts_TK.reshape(num_sequences, -1, plan.top_k)
    counts_BE = torch.zeros(num_sequences, num_experts, device=selected_BLK.device)
    counts_BE.scatter_add_(1, selected_BLK.flatten(1), torch.ones_like(selected_BLK.flatten(1), dtype=counts_BE.dtype))
    fraction_BE = counts_BE / selected_BLK[0].numel()
    mean_prob_BE = plan.router_probs_TE.reshape(num_sequences, -1, num_experts).mean(dim=1)
    return num_experts * (fraction_BE * mean_prob_BE).sum(-1).mean()


def z_loss(plan: Routing) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): L = (1/T) Σ_t (log Σ_i exp h_t,i)²."""
    return torch.logsumexp(plan.router_logits_TE, dim=-1).square().mean()


def importance_loss(plan: Routing) -> Tensor:
    """Importance loss (Shazeer et al. 2017, eq. 6): Imp_i = Σ_t g_t,i (the routing weights
    of the chosen experts, before drops); L = CV(Imp)²."""
    importance_E = torch.zeros(plan.num_experts, device=plan.gates_TK.device, dtype=plan.gates_TK.dtype)
    importance_E = importance_E.scatter_add(0, plan.selected_experts_TK.reshape(-1), plan.gates_TK.reshape(-1))
    return _cv_squared(importance_E)


def load_loss(plan: Routing) -> Tensor:
    """Load loss (Shazeer et al. 2017, eq. 11): L = CV(Load)², Load from the noisy top-k
    router's smooth estimator (`plan.load_estimate_E`); 0 when the plan has none (eval)."""
    if plan.load_estimate_E is None:
        return plan.router_logits_TE.new_zeros(())
    return _cv_squared(plan.load_estimate_E)


def entropy_loss(plan: Routing) -> Tensor:
    """Mean router entropy over tokens, −Σ_i p_t,i log p_t,i. A positive weight makes
    routing more decisive, a negative one more uniform."""
    return mean_entropy(plan.router_probs_TE)


# Losses whose weight may be negative: the sign picks the direction (entropy: a positive
# weight sharpens routing, a negative one flattens it). Every other weight must be >= 0.
SIGNED_LOSSES = frozenset({"entropy"})

AUX_LOSSES: dict[str, Callable[[Routing], Tensor]] = {
    "balance": balance_loss,
    "seq_balance": seq_balance_loss,
    "zloss": z_loss,
    "importance": importance_loss,
    "load": load_loss,
    "entropy": entropy_loss,
}


def check_aux_loss_weights(aux_loss_weights: Mapping[str, object]) -> dict[str, float]:
    """Loss name → weight as floats; one-line errors for unknown names, non-numbers and
    negative weights (which would reward what the loss penalises: a negative balance weight
    trains towards imbalance). Losses in SIGNED_LOSSES take either sign on purpose."""
    unknown = sorted(set(aux_loss_weights) - set(AUX_LOSSES))
    if unknown:
        raise ConfigError(f"unknown auxiliary loss {unknown}: pick from {', '.join(AUX_LOSSES)}")
    weights = {}
    for name, weight in aux_loss_weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"loss.{name}={weight} must be a number")
        if weight < 0 and name not in SIGNED_LOSSES:
            raise ConfigError(
                f"loss.{name}={weight} is negative, which rewards what the {name} loss penalises: "
                f"use a weight >= 0 (0 turns it off)"
            )
        weights[name] = float(weight)
    return weights


def usable_loss_weights(router: nn.Module, weights: Mapping[str, float]) -> dict[str, float]:
    """The weighted auxiliary losses `router` supports (its `supported_losses`); a weighted
    loss it does not support (e.g. balance for Soft MoE, balanced by construction) is
    dropped with a warning, and a balance loss beside aux_free's bias draws one."""
    supported = getattr(router, "supported_losses", frozenset(AUX_LOSSES))
    skipped = sorted(name for name, w in weights.items() if w and name not in supported)
    if skipped:
        warnings.warn(
            f"router {type(router).__name__} ignores auxiliary loss {skipped} "
            f"(it supports {sorted(supported) or 'none'})",
            stacklevel=4,
        )
    if weights.get("balance") and type(router).__name__ == "AuxFreeRouter":
        warnings.warn(
            "router=aux_free balances with its bias; a non-zero balance loss weight fights it: use loss=none or zloss",
            stacklevel=4,
        )
    return {name: w for name, w in weights.items() if name in supported}


def aux_losses_of(plan, weights: Mapping[str, float], device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
    """(each weighted loss's unweighted value on `plan`, their weighted sum): what a routed
    layer keeps as `aux_losses` and `aux_loss` after a training forward."""
    losses = {name: AUX_LOSSES[name](plan) for name in weights}
    return losses, sum((w * losses[name] for name, w in weights.items()), torch.zeros((), device=device))
