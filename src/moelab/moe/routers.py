"""Routing rules, one class each; every router maps tokens (T, D) to a Routing plan."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.moe.dispatch import expert_capacity, token_choice_routing
from moelab.moe.errors import ConfigError, check_num_experts
from moelab.moe.routing import Routing, RoutingContext


class TopKRouter(nn.Module):
    """Token-choice top-k routing (Shazeer et al. 2017; Switch, Fedus et al. 2021, is k=1).

    h = x W_g, p = softmax(h); each token takes the k largest p_i with weights g_i = p_i,
    or, with `normalize`, g_i = p_i / Σ_selected p_j (equal to a softmax over the k
    selected logits, as in Mixtral). Dropless unless `capacity_factor` is set: then each
    expert keeps C = ⌈cf · k · T / E⌉ assignments and the overflow is dropped (its token
    passes through the residual). `eval_capacity_factor` applies outside training
    (default: the training factor).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        normalize: bool = True,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
    ) -> None:
        super().__init__()
        check_num_experts(num_experts)
        if not 1 <= k <= num_experts:
            raise ConfigError(
                f"router.k={k} must be between 1 and experts={num_experts}: lower router.k or raise experts"
            )
        if k == 1 and normalize:
            raise ConfigError(
                "router.k=1 with router.normalize=true makes every weight 1, so the router "
                "gets no gradient from the task: set router.normalize=false"
            )
        for name, factor in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if factor is not None and factor <= 0:
                raise ConfigError(f"router.{name}={factor} must be > 0, or null for dropless routing")
        self.num_experts = num_experts
        self.k = k
        self.normalize = normalize
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = capacity_factor if eval_capacity_factor is None else eval_capacity_factor
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=d_model**-0.5)

    @property
    def causal_safe(self) -> bool:
        """Whether a token's routing depends only on that token. Capacity breaks this:
        whether a token keeps its expert depends on the other tokens of the batch,
        later positions included."""
        return self.capacity_factor is None and self.eval_capacity_factor is None

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> Routing:
        # Router math in fp32 whatever the compute dtype (ST-MoE, Zoph et al. 2022, sec. 3.3).
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, selected_TK = probs_TE.topk(self.k, dim=-1)
        if self.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = None
        if factor is not None:
            capacity = expert_capacity(x_TD.shape[0], self.num_experts, self.k, factor)
        return token_choice_routing(logits_TE, probs_TE, selected_TK, weights_TK, capacity)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, k={self.k}, normalize={self.normalize}, "
            f"capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}"
        )
