"""Dense softmax gating: every expert on every token."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.moe.dispatch import token_choice_routing
from moelab.moe.errors import check_num_experts
from moelab.moe.routers.base import linear_gate, router_logits
from moelab.moe.routing import Routing, RoutingContext


class DenseRouter(nn.Module):
    """Dense softmax gating: every expert on every token, y_t = Σ_i p_t,i f_i(x_t)."""

    kind = "dense"
    expert_rows = ("gate.weight",)
    supported_losses = frozenset({"zloss", "importance", "entropy"})
    causal_safe = True

    @property
    def experts_per_token(self) -> int:
        return self.num_experts

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        check_num_experts(num_experts)
        self.num_experts = num_experts
        self.gate = linear_gate(d_model, num_experts)

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> Routing:
        logits_TE = router_logits(x_TD, self.gate.weight)
        probs_TE = logits_TE.softmax(-1)
        every_TE = torch.arange(self.num_experts, device=x_TD.device).expand(x_TD.shape[0], -1)
        return token_choice_routing(logits_TE, probs_TE, every_TE, probs_TE, context=context)

