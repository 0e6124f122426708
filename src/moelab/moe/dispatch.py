"""Permutation into expert groups, capacity limits, and the grouped matmul.

Everything here has static shapes given (T, E, K, C): no host synchronisation, so the
same code runs under CUDA graphs or `torch.compile` and on CPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moelab.moe.errors import ConfigError
from moelab.moe.routing import Routing


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ⌈cf · k · T / E⌉ rows per expert (Switch Transformer, Fedus et al. 2021, eq. 3)."""
    if capacity_factor <= 0:
        raise ConfigError(
            f"capacity_factor={capacity_factor} must be > 0 (or null for dropless routing)"
        )
    return math.ceil(capacity_factor * top_k * num_tokens / num_experts)


def token_choice_routing(
    router_logits_TE: Tensor,
    router_probs_TE: Tensor,
    selected_experts_TK: Tensor,
    weights_TK: Tensor,
    capacity: int | None = None,
) -> Routing:
    """Build the plan for routers where each token picks K experts.

    Assignments are ordered choice-major (every token's first choice before any second
    choice, tokens in batch order within a choice), then stably sorted by expert. With a
    capacity C, the first C assignments of each expert are kept, as in GShard and
    Switch: a token's first choice outranks any token's second choice.
    """
    num_tokens, top_k = selected_experts_TK.shape
    num_experts = router_logits_TE.shape[1]
    expert_A = selected_experts_TK.t().reshape(-1)  # A = K·T assignments, choice-major
    weight_A = weights_TK.t().reshape(-1)
    token_A = torch.arange(num_tokens, device=expert_A.device).repeat(top_k)

    order_A = torch.argsort(expert_A, stable=True)
    demand_E = torch.zeros(num_experts, dtype=torch.long, device=expert_A.device)
    demand_E.scatter_add_(0, expert_A, torch.ones_like(expert_A))

    if capacity is None:
        return Routing(
            token_index_N=token_A[order_A],
            combine_weight_N=weight_A[order_A],
            group_sizes_E=demand_E,
            tokens_per_expert_E=demand_E,
            router_logits_TE=router_logits_TE,
            router_probs_TE=router_probs_TE,
            selected_experts_TK=selected_experts_TK,
        )

    # Rank of each assignment inside its expert's queue; keep ranks below C.
    sorted_expert_A = expert_A[order_A]
    group_start_E = torch.cumsum(demand_E, 0) - demand_E
    rank_A = torch.arange(expert_A.numel(), device=expert_A.device) - group_start_E[sorted_expert_A]
    keep_A = rank_A < capacity
    # Fixed buffer of E·C rows; dropped assignments go to one spare row that is cut off.
    spare = num_experts * capacity
    slot_A = torch.where(keep_A, sorted_expert_A * capacity + rank_A, spare)
    token_index_N = torch.zeros(spare + 1, dtype=torch.long, device=expert_A.device)
    token_index_N = token_index_N.scatter(0, slot_A, token_A[order_A])[:spare]
    combine_weight_N = weight_A.new_zeros(spare + 1).scatter(0, slot_A, weight_A[order_A])[:spare]
    kept_A = torch.zeros_like(keep_A).scatter(0, order_A, keep_A)
    return Routing(
        token_index_N=token_index_N,
        combine_weight_N=combine_weight_N,
        group_sizes_E=torch.full_like(demand_E, capacity),
        tokens_per_expert_E=demand_E.clamp(max=capacity),
        router_logits_TE=router_logits_TE,
        router_probs_TE=router_probs_TE,
        selected_experts_TK=selected_experts_TK,
        kept_TK=kept_A.reshape(top_k, num_tokens).t(),
        valid_N=torch.arange(spare, device=expert_A.device) % capacity < demand_E.repeat_interleave(capacity),
    )


def grouped_mm(x_ND: Tensor, w_EIO: Tensor, offsets_E: Tensor) -> Tensor:
    """Row group e of x times w[e], one kernel for all experts: (N, I) x (E, I, O) -> (N, O).

    `offsets_E` are the cumulative group ends (int32). `torch._grouped_mm` is not
    autocast-aware, so both operands are cast to the autocast dtype when one is active.
    """
    device_type = x_ND.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x_ND, w_EIO = x_ND.to(dtype), w_EIO.to(dtype)
    else:
        w_EIO = w_EIO.to(x_ND.dtype)
    out_NO = torch._grouped_mm(x_ND, w_EIO, offs=offsets_E)
    if out_NO.requires_grad:
        # The kernel's backward rejects broadcast (stride-0) gradients, e.g. from .sum().
        out_NO.register_hook(lambda grad: grad.contiguous())
    return out_NO
