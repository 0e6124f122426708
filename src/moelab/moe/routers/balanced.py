"""Token-choice routers balanced without an auxiliary loss: DeepSeek-V3's per-expert bias
(aux_free) and Sinkhorn's balanced assignment (sinkhorn)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moelab.moe.errors import ConfigError
from moelab.moe.routers.base import linear_gate, router_logits
from moelab.moe.routers.token_choice import TokenChoiceRouter
from moelab.moe.routing import Routing, RoutingContext


class AuxFreeRouter(TokenChoiceRouter):
    """Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3).

    s = σ(h); experts are selected by top-k of s_i + b_i, weighted by s_i / Σ_selected s_j
    (the bias b is not in the weights). After each optimizer step `update_bias()` sets
    b_i ← b_i + γ · sign(mean_j c_j − c_i), c_i the tokens routed to i since the last
    update, counted before any capacity drop (summed over ranks when torch.distributed is
    initialised). b is a buffer.
    """

    normalize_configurable = False
    expert_rows = ("gate.weight", "expert_bias_E")

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        update_rate: float = 1e-3,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        token_mask: str | None = None,
        rare_share: float = 0.5,
        frequent_experts: int | None = None,
        vocab_size: int | None = None,
        layer_index: int | None = None,
    ) -> None:
        super().__init__(num_experts, k, True, capacity_factor, eval_capacity_factor, False, token_mask, rare_share, vocab_size, layer_index,
                         frequent_experts)
        if update_rate < 0:
            raise ConfigError(f"router.update_rate={update_rate} must be >= 0")
        self.update_rate = update_rate
        self.gate = linear_gate(d_model, num_experts)
        self.register_buffer("expert_bias_E", torch.zeros(num_experts))
        self.register_buffer("load_since_update_E", torch.zeros(num_experts), persistent=False)

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> Routing:
        logits_TE, allowed_TE = self.masked(router_logits(x_TD, self.gate.weight), context)
        scores_TE = torch.sigmoid(logits_TE)
        selection_TE = scores_TE.detach() + self.expert_bias_E
        if allowed_TE is not None:  # the bias must not lift a masked expert (σ(−∞) = 0) into the top k
            selection_TE = selection_TE.masked_fill(~allowed_TE, float("-inf"))
        plan = self.plan(logits_TE, scores_TE / scores_TE.sum(-1, keepdim=True), selection_TE, scores_TE, context,
                         allowed_TE=allowed_TE)
        if self.training:
            chosen = plan.selected_experts_TK.reshape(-1)
            counts = torch.ones_like(chosen, dtype=self.load_since_update_E.dtype)
            if allowed_TE is not None:  # a masked choice is no assignment
                counts = allowed_TE.gather(1, plan.selected_experts_TK).reshape(-1).to(counts.dtype)
            self.load_since_update_E.scatter_add_(0, chosen, counts)
        return plan

    @torch.no_grad()
    def update_bias(self) -> None:
        """One bias step from the load seen since the last call (call after optimizer.step)."""
        load_E = self.load_since_update_E
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load_E)
        self.expert_bias_E += self.update_rate * torch.sign(load_E.mean() - load_E)
        load_E.zero_()


class SinkhornRouter(TokenChoiceRouter):
    """Balanced assignment by Sinkhorn normalisation (as in Megatron-Core; in the spirit of
    BASE layers, Lewis et al. 2021). In training, K = exp(h) is scaled alternately by rows
    and columns until rows sum to 1/T and columns to 1/E (within `tolerance`, at most
    `max_iterations`); experts are the top-k of the scaled matrix. At eval: plain top-k.

    Weights: for k = 1, σ(h_i) of the chosen expert, BASE layers' gate (Lewis et al. 2021,
    eq. 2: y = x + σ(x·w_i) f_i(x)) and Megatron-Core's; for k > 1, the softmax
    probabilities p_i of the chosen experts (renormalised over them with `normalize`).
    """

    # The guard in the scaling denominators (Megatron-Core has one too): an expert whose
    # exp(h) all underflow gets a zero column instead of 0/0 = NaN everywhere.
    EPSILON = 1e-8

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 1,
        normalize: bool = False,
        max_iterations: int = 50,
        tolerance: float = 1e-3,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        token_mask: str | None = None,
        rare_share: float = 0.5,
        frequent_experts: int | None = None,
        vocab_size: int | None = None,
        layer_index: int | None = None,
    ) -> None:
        super().__init__(num_experts, k, normalize, capacity_factor, eval_capacity_factor, False, token_mask, rare_share, vocab_size, layer_index,
                         frequent_experts)
        self.max_iterations, self.tolerance = max_iterations, tolerance
        self.gate = linear_gate(d_model, num_experts)

    @property
    def causal_safe(self) -> bool:
        return False  # the training assignment couples every token of the batch

    @classmethod
    @torch.no_grad()
    def sinkhorn(cls, logits_TE: Tensor, max_iterations: int, tolerance: float) -> Tensor:
        """Scale exp(logits) to rows summing to 1/T and columns to 1/E.

        Each row is shifted by its own maximum first: exp(h_t − max_t h_t) differs from
        exp(h_t) by a factor per row, which the row scaling absorbs, so the iteration has
        the same fixed point while every row keeps an entry of 1 (no row underflows to all
        zeros). The scalings divide by E·(column sum) + ε and T·(row sum) + ε: Megatron-Core's
        ε guard, added after the sums are scaled to about 1, so it stays negligible at any
        batch size (Megatron adds it to the raw sums, which shrink as 1/T)."""
        num_tokens, num_experts = logits_TE.shape
        matrix_TE = (logits_TE - logits_TE.max(dim=1, keepdim=True).values).exp()
        for _ in range(max_iterations):
            matrix_TE = matrix_TE / (matrix_TE.sum(0, keepdim=True) * num_experts + cls.EPSILON)
            row_error = (matrix_TE.sum(1) * num_tokens - 1).abs().max()
            if row_error < tolerance:
                break
            matrix_TE = matrix_TE / (matrix_TE.sum(1, keepdim=True) * num_tokens + cls.EPSILON)
        return matrix_TE

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> Routing:
        logits_TE, allowed_TE = self.masked(router_logits(x_TD, self.gate.weight), context)
        probs_TE = logits_TE.softmax(-1)
        selection_TE = probs_TE
        if self.training:
            selection_TE = self.sinkhorn(logits_TE, self.max_iterations, self.tolerance)
        gates_TE = torch.sigmoid(logits_TE) if self.k == 1 else probs_TE
        return self.plan(logits_TE, probs_TE, selection_TE, gates_TE, context, allowed_TE=allowed_TE)

