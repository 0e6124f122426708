"""Mixture of attention heads (Zhang et al. 2022, "Mixture of Attention Heads: Selecting
Attention Heads Per Token", MoA): attention whose heads are experts a router picks per token."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.moe.dispatch import grouped_mm
from moelab.moe.errors import ConfigError, check_num_experts
from moelab.moe.factories import accepted_keywords
from moelab.moe.losses import aux_losses_of, check_aux_loss_weights, usable_loss_weights
from moelab.moe.routing import Routing, RoutingContext


def rope_angles(seq_len: int, head_dim: int, base: float = 10000.0, device=None) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles m·θ_i, θ_i = base^(−2i/d) (Su et al. 2021, RoFormer, eq. 15),
    each (L, head_dim/2) in fp32."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_LH = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles_LH.cos(), angles_LH.sin()


def apply_rope(x_BHLD: Tensor, cos_LH: Tensor, sin_LH: Tensor) -> Tensor:
    """Rotate each pair (x_2i, x_2i+1) of every position m by the angle m·θ_i (Su et al. 2021, eq. 34).

    Pairs are adjacent dimensions, as in the paper; q·k then depends on positions only
    through their difference.
    """
    x_pairs = x_BHLD.float().unflatten(-1, (-1, 2))
    x_even, x_odd = x_pairs[..., 0], x_pairs[..., 1]
    rotated = torch.stack((x_even * cos_LH - x_odd * sin_LH, x_even * sin_LH + x_odd * cos_LH), dim=-1)
    return rotated.flatten(-2).to(x_BHLD.dtype)


def matched_head_dim(d_model: int, k: int) -> int:
    """The expert head width h whose projections cost what standard attention's do: shared K
    and V (2·D·h) plus, per selected expert, its query and output (2·D·h each) equal the
    Q, K, V and O projections' 4·D², so h = 2·D / (1 + k), rounded to a multiple of 8."""
    return max(8, round(2 * d_model / (1 + k) / 8) * 8)


class MixtureOfAttention(nn.Module):
    """E attention experts, each a head with its own query projection W_q^e ∈ R^{D×h} and
    output projection W_o^e ∈ R^{h×D}, sharing one key and one value projection (MoA, Zhang
    et al. 2022, eqs. 3-6). A token-choice router picks k experts per token with weights g:

        y_t = Σ_{e ∈ TopK(t)} g_{t,e} · W_o^eᵀ Attention(q_t^e = W_q^eᵀ x_t, K = X W_k, V = X W_v)

    The router is any token-choice router (the `router` group) through the same Routing
    plan as the FFN experts, so capacity, the balance and z losses and the statistics apply
    unchanged; queries and outputs are computed by grouped matmuls over the plan's rows.
    `causal`: each query attends to earlier positions only (with RoPE on q and k, as the
    LM's attention); the routing must then be causal-safe (a per-token router, dropless).
    """

    tag = "attn"  # statistics tags: moe/layer<i>/attn/...

    def __init__(
        self,
        d_model: int,
        router: Callable[..., nn.Module],
        num_experts: int = 8,
        k: int = 2,
        head_dim: int | str = "match",
        causal: bool = False,
        rope_base: float | None = None,
        aux_loss_weights: Mapping[str, float] | None = None,
        layer_index: int | None = None,
        router_facts: Mapping[str, object] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()

        check_num_experts(num_experts)
        if not 1 <= k <= num_experts:
            raise ConfigError(f"model.attention_k={k} must be between 1 and model.attention_experts={num_experts}")
        head_dim = matched_head_dim(d_model, k) if head_dim == "match" else head_dim
        if not isinstance(head_dim, int) or head_dim < 8 or head_dim % 8 or (rope_base is not None and head_dim % 2):
            raise ConfigError(f"model.attention_head_dim={head_dim} must be 'match' or a multiple of 8")
        self.layer_index, self.num_experts, self.head_dim = layer_index, num_experts, head_dim
        self.causal, self.rope_base, self.dropout = causal, rope_base, dropout
        facts = {"layer_index": layer_index, "k": k, **(router_facts or {})}
        self.router = router(d_model=d_model, num_experts=num_experts, **accepted_keywords(router, facts))
        if getattr(self.router, "kind", None) not in ("token_choice", "hash", "dense"):
            raise ConfigError(f"model.attention=moa routes each token to its heads: it needs a token-choice router "
                              f"(topk, switch, gshard, noisy_topk, cosine, aux_free, sinkhorn, hash), not "
                              f"{type(self.router).__name__}")
        if getattr(self.router, "kind", None) == "hash" and k != 1:
            raise ConfigError(f"router=hash sends each token to one head: set model.attention_k=1 (not {k})")
        self.experts = _AttentionExperts(d_model, head_dim, num_experts)
        self.w_k_DH = nn.Parameter(torch.empty(d_model, head_dim))
        self.w_v_DH = nn.Parameter(torch.empty(d_model, head_dim))
        self.aux_loss_weights = usable_loss_weights(self.router, check_aux_loss_weights(aux_loss_weights or {}))
        self.aux_losses: dict[str, Tensor] = {}
        self.aux_loss: Tensor | None = None
        self.last_plan: Routing | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, in_std: float | None = None, out_std: float | None = None) -> None:
        """Q, K, V ~ N(0, in_std²) (default D^-1/2); W_o ~ N(0, out_std²) (default (k·h)^-1/2:
        a token's output sums k weighted heads)."""
        d_model = self.w_k_DH.shape[0]
        in_std = d_model**-0.5 if in_std is None else in_std
        out_std = self.head_dim**-0.5 if out_std is None else out_std
        for w in (self.w_k_DH, self.w_v_DH, self.experts.w_q_EDH):
            nn.init.normal_(w, std=in_std)
        nn.init.normal_(self.experts.w_o_EHD, std=out_std)

    @property
    def causal_safe(self) -> bool:
        return bool(getattr(self.router, "causal_safe", False))

    def forward(self, x: Tensor, token_ids: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        """x: (B, L, D); token_ids (B, L) for routers that hash ids. (`attn_mask` and
        `is_causal` are timm's Block arguments: no mask is supported.)"""
        if attn_mask is not None:
            raise ConfigError("model.attention=moa takes no attention mask")
        batch, seq_len, d_model = x.shape
        x_TD = x.reshape(-1, d_model)
        plan = self.router(x_TD, RoutingContext.for_input(x, token_ids))
        if plan.row_TK is None:
            raise ConfigError(f"model.attention=moa needs a token-choice plan; {type(self.router).__name__} gives none")
        if torch.is_autocast_enabled(x.device.type):
            x_TD = x_TD.to(torch.get_autocast_dtype(x.device.type))
        num_tokens, top_k = plan.row_TK.shape
        # Queries: the plan's rows (tokens grouped by expert) through each expert's W_q.
        x_ND, group_sizes_E = plan.dispatch(x_TD)
        offsets_E = torch.cumsum(group_sizes_E, 0, dtype=torch.int32)
        q_NH = grouped_mm(x_ND, self.experts.w_q_EDH, offsets_E)
        rows = q_NH.shape[0]
        # Each (token, choice)'s query; a dropped choice (row N) reads a zero row and is discarded below.
        q_TKH = torch.cat([q_NH, q_NH.new_zeros(1, self.head_dim)]).index_select(0, plan.row_TK.reshape(-1))
        q_BKLH = q_TKH.view(batch, seq_len, top_k, -1).permute(0, 2, 1, 3)
        k_B1LH = (x_TD @ self.w_k_DH.to(x_TD.dtype)).view(batch, 1, seq_len, -1)
        v_B1LH = (x_TD @ self.w_v_DH.to(x_TD.dtype)).view(batch, 1, seq_len, -1)
        if self.rope_base is not None:
            cos_LH, sin_LH = rope_angles(seq_len, self.head_dim, self.rope_base, device=x.device)
            q_BKLH, k_B1LH = apply_rope(q_BKLH, cos_LH, sin_LH), apply_rope(k_B1LH, cos_LH, sin_LH)
        o_BKLH = F.scaled_dot_product_attention(
            q_BKLH, k_B1LH.expand_as(q_BKLH), v_B1LH.expand_as(q_BKLH), is_causal=self.causal or is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        o_TKH = o_BKLH.permute(0, 2, 1, 3).reshape(num_tokens * top_k, -1)
        # Back to the plan's rows: row r holds the output of the (token, choice) it serves.
        o_NH = torch.cat([o_TKH, o_TKH.new_zeros(1, o_TKH.shape[1])]).index_select(0, plan.choice_of_row_N(rows))
        y_TD = plan.combine(grouped_mm(o_NH, self.experts.w_o_EHD, offsets_E))
        self.last_plan = plan
        if self.training:
            self.aux_losses, self.aux_loss = aux_losses_of(plan, self.aux_loss_weights, x.device)
        return y_TD.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, head_dim={self.head_dim}, causal={self.causal}, rope={self.rope_base is not None}"


class _AttentionExperts(nn.Module):
    """The experts' own weights: query W_q (E, D, h) and output W_o (E, h, D) stacks."""

    def __init__(self, d_model: int, head_dim: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w_q_EDH = nn.Parameter(torch.empty(num_experts, d_model, head_dim))
        self.w_o_EHD = nn.Parameter(torch.empty(num_experts, head_dim, d_model))
