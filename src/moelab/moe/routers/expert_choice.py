"""Expert choice (Zhou et al. 2022): each expert picks its top tokens."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moelab.moe.errors import ConfigError, check_num_experts
from moelab.moe.routers.base import linear_gate, router_logits
from moelab.moe.routing import Routing, RoutingContext


class ExpertChoiceRouter(nn.Module):
    """Expert choice (Zhou et al. 2022): S = softmax(h) over experts; each expert takes the
    c = ⌈cf · T / E⌉ tokens with the largest S[:, i], weighted by those S values. Every
    expert gets exactly c tokens; a token may get several experts or none (counted in
    the plan's `unrouted_fraction`)."""

    kind = "expert_choice"
    expert_rows = ("gate.weight",)
    supported_losses = frozenset({"zloss", "entropy"})
    causal_safe = False  # which tokens an expert takes depends on the whole batch

    @property
    def experts_per_token(self) -> float:
        """On average: E experts take c = cf·T/E tokens each."""
        return self.capacity_factor

    def __init__(self, d_model: int, num_experts: int, capacity_factor: float = 1.0) -> None:
        super().__init__()
        check_num_experts(num_experts)
        if capacity_factor <= 0:
            raise ConfigError(f"router.capacity_factor={capacity_factor} must be > 0")
        self.num_experts, self.capacity_factor = num_experts, capacity_factor
        self.gate = linear_gate(d_model, num_experts)

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> Routing:
        num_tokens = x_TD.shape[0]
        logits_TE = router_logits(x_TD, self.gate.weight)
        probs_TE = logits_TE.softmax(-1)
        capacity = min(num_tokens, math.ceil(self.capacity_factor * num_tokens / self.num_experts))
        gates_CE, tokens_CE = probs_TE.topk(capacity, dim=0)
        sizes_E = torch.full((self.num_experts,), capacity, dtype=torch.long, device=x_TD.device)
        return Routing(
            token_index_N=tokens_CE.t().reshape(-1),
            combine_weight_N=gates_CE.t().reshape(-1),
            group_sizes_E=sizes_E,
            tokens_per_expert_E=sizes_E,
            router_logits_TE=logits_TE,
            router_probs_TE=probs_TE,
            context=context,
        )

