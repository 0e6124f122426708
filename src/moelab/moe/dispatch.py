"""Permutation into expert groups, capacity limits, and the grouped matmul.

Everything here has static shapes given (T, E, K, C): no host synchronisation, so the
same code runs under CUDA graphs or `torch.compile` and on CPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moelab.moe.errors import ConfigError
from moelab.moe.routing import Routing, RoutingContext


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ⌈cf · k · T / E⌉ rows per expert (Switch Transformer, Fedus et al. 2021, eq. 3),
    at most T (an expert cannot receive a token twice)."""
    if capacity_factor <= 0:
        raise ConfigError(
            f"capacity_factor={capacity_factor} must be > 0 (or null for dropless routing)"
        )
    return min(num_tokens, math.ceil(capacity_factor * top_k * num_tokens / num_experts))


def token_choice_routing(
    router_logits_TE: Tensor,
    router_probs_TE: Tensor,
    selected_experts_TK: Tensor,
    weights_TK: Tensor,
    capacity: int | None = None,
    priority_T: Tensor | None = None,
    active_TK: Tensor | None = None,
    load_estimate_E: Tensor | None = None,
    context: RoutingContext | None = None,
) -> Routing:
    """Build the plan for routers where each token picks K experts.

    Assignments are ordered choice-major (every token's first choice before any second
    choice), tokens in batch order within a choice, or in decreasing `priority_T` (batch
    priority routing, Riquelme et al. 2021), then stably sorted by expert. With a
    capacity C, the first C assignments in each expert's queue are kept, as in GShard
    and Switch. `active_TK` marks choices the router itself skips (GShard's random
    second expert): they take no capacity and get no output.
    """
    num_tokens, top_k = selected_experts_TK.shape
    num_experts = router_logits_TE.shape[1]
    device = selected_experts_TK.device
    # The queue: tokens in batch order, or by decreasing priority (None: batch order, which
    # needs no reordering of the (T, K) tensors).
    token_order_T = None if priority_T is None else torch.argsort(priority_T, descending=True, stable=True)

    def queued(values_TK: Tensor) -> Tensor:
        """(T, K) by token -> (A,) of A = K·T assignments, choice-major, tokens in queue order."""
        return (values_TK if token_order_T is None else values_TK[token_order_T]).t().reshape(-1)

    expert_A, weight_A = queued(selected_experts_TK), queued(weights_TK)
    token_A = (torch.arange(num_tokens, device=device) if token_order_T is None else token_order_T).repeat(top_k)
    active_A = None if active_TK is None else queued(active_TK)

    def to_token_layout(values_A: Tensor) -> Tensor:
        """(A,) in queue order -> (T, K) indexed by token."""
        values_KT = values_A.reshape(top_k, num_tokens)
        if token_order_T is None:
            return values_KT.t()
        return torch.empty_like(values_KT).scatter(1, token_order_T.expand(top_k, -1), values_KT).t()

    common = dict(
        router_logits_TE=router_logits_TE,
        router_probs_TE=router_probs_TE,
        selected_experts_TK=selected_experts_TK,
        gates_TK=weights_TK,
        load_estimate_E=load_estimate_E,
        context=context,
    )

    def row_layout(order_A: Tensor, row_sorted_A: Tensor) -> Tensor:
        """The grouped row of each (token, choice), from the rows of the sorted assignments."""
        return to_token_layout(torch.empty_like(row_sorted_A).scatter(0, order_A, row_sorted_A))

    if capacity is None:
        order_A = torch.argsort(expert_A, stable=True)
        rows_E = torch.zeros(num_experts, dtype=torch.long, device=device)
        rows_E.scatter_add_(0, expert_A, torch.ones_like(expert_A))
        common["row_TK"] = row_layout(order_A, torch.arange(order_A.numel(), device=device))
        if active_A is None:
            return Routing(
                token_index_N=token_A[order_A],
                combine_weight_N=weight_A[order_A],
                group_sizes_E=rows_E,
                tokens_per_expert_E=rows_E,
                **common,
            )
        # Skipped choices keep their row (static shapes) with weight 0 and are not counted.
        processed_E = torch.zeros_like(rows_E).scatter_add_(0, expert_A, active_A.long())
        return Routing(
            token_index_N=token_A[order_A],
            combine_weight_N=(weight_A * active_A)[order_A],
            group_sizes_E=rows_E,
            tokens_per_expert_E=processed_E,
            kept_TK=to_token_layout(active_A),
            valid_N=active_A[order_A],
            **common,
        )

    # Skipped choices queue at a virtual expert E that has no rows.
    queue_A = expert_A if active_A is None else torch.where(active_A, expert_A, num_experts)
    order_A = torch.argsort(queue_A, stable=True)
    demand_E1 = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    demand_E1.scatter_add_(0, queue_A, torch.ones_like(queue_A))
    sorted_queue_A = queue_A[order_A]
    group_start_E1 = torch.cumsum(demand_E1, 0) - demand_E1
    rank_A = torch.arange(queue_A.numel(), device=device) - group_start_E1[sorted_queue_A]
    keep_A = (rank_A < capacity) & (sorted_queue_A < num_experts)
    # Fixed buffer of E·C rows; dropped assignments go to one spare row that is cut off.
    spare = num_experts * capacity
    slot_A = torch.where(keep_A, sorted_queue_A * capacity + rank_A, spare)
    token_index_N = torch.zeros(spare + 1, dtype=torch.long, device=device)
    token_index_N = token_index_N.scatter(0, slot_A, token_A[order_A])[:spare]
    combine_weight_N = weight_A.new_zeros(spare + 1).scatter(0, slot_A, weight_A[order_A])[:spare]
    kept_E = demand_E1[:num_experts].clamp(max=capacity)
    kept_A = torch.zeros_like(keep_A).scatter(0, order_A, keep_A)
    return Routing(
        token_index_N=token_index_N,
        combine_weight_N=combine_weight_N,
        group_sizes_E=torch.full_like(kept_E, capacity),
        tokens_per_expert_E=kept_E,
        kept_TK=to_token_layout(kept_A),
        valid_N=torch.arange(spare, device=device) % capacity < kept_E.repeat_interleave(capacity),
        row_TK=row_layout(order_A, slot_A),
        **common,
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
    if x_ND.dtype == torch.float32 and torch.compiler.is_compiling():
        # The op's meta (fake-tensor) kernel accepts only bf16/fp16, though the CPU and CUDA
        # kernels run fp32: under torch.compile an fp32 grouped matmul runs eagerly (a graph
        # break around it); bf16 compiles into the graph.
        return _grouped_mm_eager(x_ND, w_EIO, offsets_E)
    return _grouped_mm(x_ND, w_EIO, offsets_E)


def _grouped_mm(x_ND: Tensor, w_EIO: Tensor, offsets_E: Tensor) -> Tensor:
    out_NO = torch._grouped_mm(x_ND, w_EIO, offs=offsets_E)
    if out_NO.requires_grad:
        # The kernel's backward rejects broadcast (stride-0) gradients, e.g. from .sum().
        out_NO.register_hook(lambda grad: grad.contiguous())
    return out_NO


_grouped_mm_eager = torch.compiler.disable(_grouped_mm)
