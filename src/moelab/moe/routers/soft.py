"""Routers that mix instead of pick: Soft MoE's slots (Puigcerver et al. 2023) and SMEAR's
merged experts (Muqeeth et al. 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.moe.errors import ConfigError, check_num_experts
from moelab.moe.routers.base import linear_gate, router_logits
from moelab.moe.routing import MergedRouting, RoutingContext, SoftRouting


class SoftMoERouter(nn.Module):
    """Soft MoE (Puigcerver et al. 2023), per sequence X ∈ R^{m×d} and S = E·p slots:
    logits L = scale · l2norm_rows(X) · l2norm_cols(Φ), Φ ∈ R^{d×S} learned, `scale` a
    learned scalar (init 1); dispatch weights D = softmax of L over tokens, combine weights
    C = softmax of L over slots; slot s goes to expert ⌊s / p⌋. `num_slots`, if given,
    sets S (a multiple of E) in place of `slots_per_expert`."""

    kind = "soft"
    supported_losses = frozenset()
    causal_safe = False  # every slot mixes every token of the sequence

    def __init__(self, d_model: int, num_experts: int, slots_per_expert: int = 1, num_slots: int | None = None) -> None:
        super().__init__()
        check_num_experts(num_experts)
        if num_slots is not None:
            if slots_per_expert != 1:
                raise ConfigError("set router.num_slots or router.slots_per_expert, not both")
            if num_slots < num_experts or num_slots % num_experts:
                raise ConfigError(f"router.num_slots={num_slots} must be a positive multiple of experts={num_experts}")
            slots_per_expert = num_slots // num_experts
        if slots_per_expert < 1:
            raise ConfigError(f"router.slots_per_expert={slots_per_expert} must be >= 1")
        self.num_experts, self.slots_per_expert = num_experts, slots_per_expert
        self.slot_embeddings_DS = nn.Parameter(torch.randn(d_model, num_experts * slots_per_expert) * d_model**-0.5)
        self.scale = nn.Parameter(torch.ones(1))  # 1-D: FSDP shards no scalars

    def no_weight_decay(self) -> set[str]:
        """timm's convention: parameters AdamW should not decay (L2-normalised in forward)."""
        return {"slot_embeddings_DS"}

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> SoftRouting:
        num_sequences = 1 if context is None else context.num_sequences
        x_BMD = x_TD.float().reshape(num_sequences, -1, x_TD.shape[-1])
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_BMS = self.scale * torch.einsum(
                "bmd,ds->bms", F.normalize(x_BMD, dim=-1), F.normalize(self.slot_embeddings_DS.float(), dim=0)
            )
        return SoftRouting(
            dispatch_BMS=logits_BMS.softmax(dim=1),
            combine_BMS=logits_BMS.softmax(dim=2),
            num_experts=self.num_experts,
            context=context,
        )


class SmearRouter(nn.Module):
    """SMEAR (Muqeeth et al. 2023): soft merging of experts with adaptive routing. The router
    reads the mean of a sequence's inputs, x̄ (or, with `per="token"`, each token's own x),
    p = softmax(x̄ W_gᵀ), and the layer runs one FFN whose parameters are Σ_i p_i W_i (for
    every weight and bias of the experts), so its cost is one expert's FFN plus the merge,
    and the router gets gradients through the merged weights, with no estimator.

    The per-sequence form (the paper's) mixes a whole sequence into the routing of each of
    its tokens: not causal-safe, so the causal LM refuses it; `per="token"` is.
    Initialisation: MoELayer draws each expert's weights sqrt(E) wider than one FFN's, so the
    merged FFN starts at the dense FFN's scale (at even p, Σ_i p_i W_i has std σ/sqrt(E))."""

    kind = "smear"
    supported_losses = frozenset({"zloss", "entropy"})
    experts_per_token = 1

    def __init__(self, d_model: int, num_experts: int, per: str = "sequence") -> None:
        super().__init__()
        check_num_experts(num_experts)
        if per not in ("sequence", "token"):
            raise ConfigError(f"router.per={per!r}: SMEAR merges the experts per sequence or per token")
        self.num_experts, self.per = num_experts, per
        self.causal_safe = per == "token"
        self.gate = linear_gate(d_model, num_experts)

    @property
    def merged_init_gain(self) -> float:
        return float(self.num_experts) ** 0.5

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> MergedRouting:
        if self.per == "token":
            logits_TE = router_logits(x_TD, self.gate.weight)
            probs_TE = logits_TE.softmax(dim=-1)
            return MergedRouting(logits_TE, probs_TE, probs_TE, per_token=True, context=context)
        num_sequences = 1 if context is None else context.num_sequences
        x_BLD = x_TD.reshape(num_sequences, -1, x_TD.shape[-1])
        logits_BE = router_logits(x_BLD.float().mean(1), self.gate.weight)
        probs_BE = logits_BE.softmax(dim=-1)
        seq_len = x_BLD.shape[1]
        return MergedRouting(logits_BE.repeat_interleave(seq_len, 0), probs_BE.repeat_interleave(seq_len, 0), probs_BE,
                             per_token=False, context=context)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, per={self.per}"
