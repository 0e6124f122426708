"""The Routing plan: the one contract between a router and everything downstream of it.

A plan says which rows of a grouped-by-expert buffer come from which token and with
which weight they return. `dispatch` builds that buffer (tokens grouped by expert, plus
the row count of each expert's group), `combine` scatters expert outputs back to tokens.
Losses, statistics and callbacks read the plan, never the router.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RoutingContext:
    """What a router may need beyond the token vectors.

    num_sequences, seq_len: the (B, L) the T = B·L tokens came from (row-major), so
    routers that work per sequence (Soft MoE) or per position (hash on patches) can.
    token_ids_T: token ids (language models), for routers that hash ids.
    """

    num_sequences: int
    seq_len: int
    token_ids_T: Tensor | None = None

    @staticmethod
    def for_input(x: Tensor, token_ids: Tensor | None = None) -> "RoutingContext":
        """Context of an input shaped (B, L, D) or (T, D) (a 2-D input is one sequence)."""
        num_sequences = x.shape[0] if x.dim() == 3 else 1
        seq_len = x.shape[-2]
        ids = None if token_ids is None else token_ids.reshape(-1)
        return RoutingContext(num_sequences, seq_len, ids)


# How token-choice plans move rows. None (auto): by gathers (`Routing.row_TK`, no atomics)
# on accelerators, and by the generic index + index_add path on the CPU, where index_add is
# a plain loop over rows and measured faster (docs/benchmarks.md). True / False force one
# path everywhere; the benchmarks flip it to compare the two.
GATHER_ROWS: bool | None = None


def _gathers(x: Tensor) -> bool:
    return x.device.type != "cpu" if GATHER_ROWS is None else GATHER_ROWS


class _GatherRows(torch.autograd.Function):
    """out_MD = source_RD[index_M], whose backward is a gather as well.

    Rows move by `index_select`, which copies whole rows (on CPU 9x faster than
    `source_RD[index_M]`, which indexes element by element).
    Autograd's backward of an index is a scatter-add (atomics, or a sort on CUDA). Here the
    caller knows, for every source row r, the output rows copied from it: `back_RJ[r]`
    (J of them at most; the value M marks "none" when `missing` is set). The gradient of
    row r is then the sum of J gathered rows of the output gradient.
    """

    @staticmethod
    def forward(ctx, source_RD: Tensor, index_M: Tensor, back_RJ: Tensor, missing: bool) -> Tensor:
        ctx.save_for_backward(back_RJ)
        ctx.missing = missing
        return source_RD.index_select(0, index_M)

    @staticmethod
    def backward(ctx, grad_MD: Tensor):
        (back_RJ,) = ctx.saved_tensors
        if ctx.missing:
            grad_MD = torch.cat([grad_MD, grad_MD.new_zeros(1, grad_MD.shape[1])])
        rows, choices = back_RJ.shape
        grad_RJD = grad_MD.index_select(0, back_RJ.reshape(-1)).view(rows, choices, -1)
        return grad_RJD.sum(1) if choices > 1 else grad_RJD.squeeze(1), None, None, None


class _PerTokenLogits:
    """Shape of a plan with per-token router logits (Routing, MergedRouting)."""

    router_logits_TE: Tensor
    selected_experts_TK: Tensor | None

    @property
    def num_tokens(self) -> int:
        return self.router_logits_TE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.router_logits_TE.shape[1]

    @property
    def top_k(self) -> int | None:
        """Choices per token for token-choice plans, else None."""
        return None if self.selected_experts_TK is None else self.selected_experts_TK.shape[1]


def _stats_without_drops(tokens_per_expert_E: Tensor, probs_TE: Tensor) -> dict[str, Tensor]:
    """`stats()` of plans where every token reaches the experts (Soft MoE's slots, SMEAR's merge)."""
    zero = torch.zeros((), device=probs_TE.device)
    return {
        "tokens_per_expert": tokens_per_expert_E,
        "unrouted_fraction": zero,
        "dropped_fraction": zero,
        "router_entropy": mean_entropy(probs_TE.detach().float()),
    }


@dataclass
class Routing(_PerTokenLogits):
    """Where every token goes, for one MoE layer and one batch.

    Shapes: T tokens, E experts, K choices per token, N rows in the grouped buffer
    (N = T·K without capacity; N = E·C with capacity C per expert, unused rows padded).

    token_index_N:       source token of each grouped row (padding rows point at token 0).
    combine_weight_N:    weight of each row in its token's output (0 for padding rows).
    group_sizes_E:       rows per expert in the grouped buffer, the grouped matmul's groups.
    tokens_per_expert_E: real (non-padding) rows per expert.
    router_logits_TE:    raw router logits h, fp32.
    router_probs_TE:     router probabilities p (softmax of h, or the router's scores), fp32.
    selected_experts_TK: the experts each token chose before any capacity drop
                         (token-choice routers; None for expert-choice routers).
    gates_TK:            the routing weights of those choices before any drop.
    kept_TK:             which choices were processed (None: all were); capacity drops
                         and GShard's random second-expert drops are not.
    valid_N:             which grouped rows are real (None: all are).
    load_estimate_E:     differentiable expected load (noisy top-k's estimator), if any.
    context:             the (B, L) shape and ids the tokens came from.
    row_TK:              the grouped row of each token's k-th choice, N where it has none
                         (dropped). Token-choice plans set it; `dispatch` and `combine` then
                         move rows by gathers alone, forward and backward (see `_GatherRows`).
    """

    token_index_N: Tensor
    combine_weight_N: Tensor
    group_sizes_E: Tensor
    tokens_per_expert_E: Tensor
    router_logits_TE: Tensor
    router_probs_TE: Tensor
    selected_experts_TK: Tensor | None = None
    gates_TK: Tensor | None = None
    kept_TK: Tensor | None = None
    valid_N: Tensor | None = None
    load_estimate_E: Tensor | None = None
    context: RoutingContext | None = None
    row_TK: Tensor | None = None

    def dispatch(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens grouped by expert, (N, D), and the rows per expert, (E,). Local, no comms."""
        if self.row_TK is None or not _gathers(x_TD):
            return x_TD.index_select(0, self.token_index_N), self.group_sizes_E
        # Backward: each token's gradient is the sum of its k rows' gradients, gathered.
        return _GatherRows.apply(x_TD, self.token_index_N, self.row_TK, self.kept_TK is not None), self.group_sizes_E

    def combine(self, y_ND: Tensor) -> Tensor:
        """Weighted sum of each token's expert outputs, (T, D); a token with no kept row gets 0.

        Token-choice plans gather each token's k rows and sum them weighted, in y's dtype
        (the sum accumulates in fp32 and rounds once).
        Other plans (expert choice: any number of rows per token) scatter-add in fp32.
        """
        if self.row_TK is None or not _gathers(y_ND):
            weighted_ND = y_ND.float() * self.combine_weight_N.unsqueeze(-1).float()
            out_TD = weighted_ND.new_zeros(self.num_tokens, y_ND.shape[-1])
            return out_TD.index_add(0, self.token_index_N, weighted_ND).to(y_ND.dtype)
        rows, (num_tokens, top_k) = y_ND.shape[0], self.row_TK.shape
        dropped = self.kept_TK is not None
        # A dropped choice reads some real row and gets weight 0 (no gradient reaches it).
        row_TK = self.row_TK.clamp(max=rows - 1) if dropped else self.row_TK
        weight_TK = self.combine_weight_N[row_TK]
        if dropped:
            weight_TK = torch.where(self.row_TK < rows, weight_TK, torch.zeros_like(weight_TK))
        # For the backward: the (token, choice) each row serves, T·K for padding rows.
        choice_N = self.choice_of_row_N(rows)
        y_TKD = _GatherRows.apply(y_ND, row_TK.reshape(-1), choice_N.unsqueeze(1), self.valid_N is not None)
        y_TKD = y_TKD.reshape(num_tokens, top_k, -1)  # reshape: its backward may get an expanded gradient
        # An elementwise product and a sum over k (fp32 accumulation inside the sum): a batched
        # matmul here is T products of (1, k) x (k, D), which cuBLAS runs as slow gemv kernels.
        return (y_TKD * weight_TK.to(y_ND.dtype).unsqueeze(-1)).sum(1)

    def choice_of_row_N(self, rows: int) -> Tensor:
        """For each of the N = `rows` grouped rows, the (token, choice) it serves as t·K + k
        (`row_TK` inverted); T·K for padding rows, which serve none. Token-choice plans only."""
        choices = self.row_TK.numel()
        choice_N = torch.full((rows + 1,), choices, dtype=torch.long, device=self.row_TK.device)
        return choice_N.scatter(0, self.row_TK.reshape(-1), torch.arange(choices, device=self.row_TK.device))[:rows]

    def expert_index_N(self) -> Tensor:
        """The expert each grouped row belongs to."""
        experts_E = torch.arange(self.num_experts, device=self.group_sizes_E.device)
        return torch.repeat_interleave(experts_E, self.group_sizes_E, output_size=self.token_index_N.numel())

    @torch.no_grad()
    def expert_share_TE(self) -> Tensor:
        """How much of each token each expert processed: 1 per real (token, expert) row.

        Summed over tokens of a class (or position, or token category) this gives the
        expert × class tables of the specialisation callbacks.
        """
        share_TE = torch.zeros(self.num_tokens, self.num_experts, device=self.token_index_N.device)
        ones_N = torch.ones_like(self.token_index_N, dtype=share_TE.dtype)
        if self.valid_N is not None:
            ones_N = ones_N * self.valid_N
        return share_TE.index_put_((self.token_index_N, self.expert_index_N()), ones_N, accumulate=True)

    @torch.no_grad()
    def stats(self) -> dict[str, Tensor]:
        """Detached statistics for logging callbacks (computed only when asked for).

        tokens_per_expert: real rows per expert. unrouted_fraction: share of tokens that
        reached no expert (dropped by capacity, or taken by no expert). dropped_fraction:
        share of token-choice assignments not processed: capacity drops, and GShard's random
        second-expert skips in training (0 without choices).
        router_entropy: mean over tokens of −Σ_i p_i log p_i.
        """
        probs = self.router_probs_TE.detach()
        reached_T = self.expert_share_TE().sum(-1) > 0
        dropped = torch.zeros((), device=probs.device)
        if self.kept_TK is not None:
            dropped = 1.0 - self.kept_TK.float().mean()
        return {
            "tokens_per_expert": self.tokens_per_expert_E.detach(),
            "unrouted_fraction": 1.0 - reached_T.float().mean(),
            "dropped_fraction": dropped,
            "router_entropy": mean_entropy(probs),
        }


def mean_entropy(probs_TE: Tensor) -> Tensor:
    """Mean over tokens of −Σ_i p_i log p_i, rows renormalised to sum to 1."""
    probs_TE = probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()


@dataclass
class SoftRouting:
    """Soft MoE plan (Puigcerver et al. 2023): every slot is a weighted mix of all tokens of
    one sequence, and every token's output a weighted mix of all slots' outputs.

    Shapes: B sequences of M tokens (T = B·M), E experts with P slots each (S = E·P).
    Grouped rows are ordered (expert, sequence, slot): expert e gets B·P rows.

    dispatch_BMS: softmax over tokens (dim 1) of the slot logits: columns sum to 1.
    combine_BMS:  softmax over slots (dim 2) of the same logits: rows sum to 1.
    """

    dispatch_BMS: Tensor
    combine_BMS: Tensor
    num_experts: int
    context: RoutingContext | None = None
    selected_experts_TK = None
    kept_TK = None
    load_estimate_E = None

    @property
    def num_tokens(self) -> int:
        return self.dispatch_BMS.shape[0] * self.dispatch_BMS.shape[1]

    @property
    def slots_per_expert(self) -> int:
        return self.dispatch_BMS.shape[2] // self.num_experts

    @property
    def top_k(self) -> None:
        return None

    @property
    def group_sizes_E(self) -> Tensor:
        rows = self.dispatch_BMS.shape[0] * self.slots_per_expert
        return torch.full((self.num_experts,), rows, dtype=torch.long, device=self.dispatch_BMS.device)

    @property
    def tokens_per_expert_E(self) -> Tensor:
        """Slots per expert (every slot mixes all tokens of its sequence)."""
        return self.group_sizes_E

    @property
    def router_probs_TE(self) -> Tensor:
        """Each token's combine weight summed over each expert's slots: a distribution over experts."""
        B, M, S = self.combine_BMS.shape
        return self.combine_BMS.reshape(B * M, self.num_experts, S // self.num_experts).sum(-1)

    def dispatch(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        B, M, S = self.dispatch_BMS.shape
        x_BMD = x_TD.reshape(B, M, -1)
        slots_BSD = torch.einsum("bms,bmd->bsd", self.dispatch_BMS.to(x_BMD.dtype), x_BMD)
        slots_EBPD = slots_BSD.reshape(B, self.num_experts, self.slots_per_expert, -1).transpose(0, 1)
        return slots_EBPD.reshape(B * S, -1), self.group_sizes_E

    def combine(self, y_ND: Tensor) -> Tensor:
        B, M, S = self.combine_BMS.shape
        y_BSD = y_ND.reshape(self.num_experts, B, self.slots_per_expert, -1).transpose(0, 1).reshape(B, S, -1)
        return torch.einsum("bms,bsd->bmd", self.combine_BMS.to(y_BSD.dtype), y_BSD).reshape(B * M, -1)

    @torch.no_grad()
    def expert_share_TE(self) -> Tensor:
        """Each token's dispatch weight summed over each expert's slots."""
        B, M, S = self.dispatch_BMS.shape
        return self.dispatch_BMS.reshape(B * M, self.num_experts, S // self.num_experts).sum(-1).float()

    @torch.no_grad()
    def stats(self) -> dict[str, Tensor]:
        return _stats_without_drops(self.tokens_per_expert_E, self.router_probs_TE)


@dataclass
class MergedRouting(_PerTokenLogits):
    """SMEAR plan (Muqeeth et al. 2023, "Soft Merging of Experts with Adaptive Routing"):
    no token is sent anywhere. For each group g, a sequence or (`per_token`) a token, the
    experts' parameters are merged with the router's probabilities, W̄_g = Σ_i p_{g,i} W_i,
    and the merged FFN runs once on the group's tokens (`GroupedExperts.merged_forward`).

    merge_GE: p per group, rows sum to 1 (G = B sequences, or T tokens).
    router_logits_TE / router_probs_TE: per token (a sequence's repeated over its tokens),
    for the z-loss, the entropy and the statistics.
    """

    router_logits_TE: Tensor
    router_probs_TE: Tensor
    merge_GE: Tensor
    per_token: bool
    context: RoutingContext | None = None
    selected_experts_TK = None
    gates_TK = None
    kept_TK = None
    valid_N = None
    load_estimate_E = None

    @property
    def tokens_per_expert_E(self) -> Tensor:
        """Each expert's share of the merged weights, summed over tokens (a soft count)."""
        return self.router_probs_TE.detach().sum(0)

    @torch.no_grad()
    def expert_share_TE(self) -> Tensor:
        """Each expert's merge weight in each token's FFN."""
        return self.router_probs_TE.detach().float()

    @torch.no_grad()
    def stats(self) -> dict[str, Tensor]:
        return _stats_without_drops(self.tokens_per_expert_E, self.router_probs_TE)
