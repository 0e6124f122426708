"""The Routing plan: the one contract between a router and everything downstream of it.

A plan says which rows of a grouped-by-expert buffer come from which token and with
which weight they return. `dispatch` builds that buffer (tokens grouped by expert, plus
the row count of each expert's group), `combine` scatters expert outputs back to tokens.
Losses and statistics read the plan, never the router.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Routing:
    """Where every token goes, for one MoE layer and one batch.

    Shapes: T tokens, E experts, K choices per token, N rows in the grouped buffer
    (N = T·K without capacity; N = E·C with capacity C per expert, unused rows padded).

    token_index_N:      source token of each grouped row (padding rows point at token 0).
    combine_weight_N:   weight of each row in its token's output (0 for padding rows).
    group_sizes_E:      rows per expert in the grouped buffer, the grouped matmul's groups.
    tokens_per_expert_E: real (kept) token assignments per expert.
    router_logits_TE:   raw router logits h, fp32.
    router_probs_TE:    router probabilities p (softmax of h), fp32.
    selected_experts_TK: the experts each token chose, before any capacity drop.
    kept_TK:            which choices survived capacity (None: dropless, all kept).
    """

    token_index_N: Tensor
    combine_weight_N: Tensor
    group_sizes_E: Tensor
    tokens_per_expert_E: Tensor
    router_logits_TE: Tensor
    router_probs_TE: Tensor
    selected_experts_TK: Tensor
    kept_TK: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.router_logits_TE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.router_logits_TE.shape[1]

    @property
    def top_k(self) -> int:
        return self.selected_experts_TK.shape[1]

    def dispatch(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens grouped by expert, (N, D), and the rows per expert, (E,). Local, no comms."""
        return x_TD[self.token_index_N], self.group_sizes_E

    def combine(self, y_ND: Tensor) -> Tensor:
        """Weighted sum of each token's expert outputs, (T, D); a token with no kept row gets 0."""
        weighted_ND = y_ND * self.combine_weight_N.unsqueeze(-1).to(y_ND.dtype)
        out_TD = y_ND.new_zeros(self.num_tokens, y_ND.shape[-1])
        return out_TD.index_add(0, self.token_index_N, weighted_ND)

    @torch.no_grad()
    def stats(self) -> dict[str, Tensor]:
        """Detached statistics for logging callbacks (computed only when asked for)."""
        probs = self.router_probs_TE.detach()
        entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
        kept = self.tokens_per_expert_E.sum()
        assignments = self.num_tokens * self.top_k
        return {
            "tokens_per_expert": self.tokens_per_expert_E.detach(),
            "dropped_fraction": 1.0 - kept.float() / assignments,
            "router_entropy": entropy,
        }
