"""Routers that mix instead of pick: Soft MoE's slots (Puigcerver et al. 2023) and SMEAR's
merged experts (Muqeeth et al. 2023)."""

from __future__ import annotations

import math
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
    sets S (a multiple of E) in place of `slots_per_expert`.

    Compute: each slot runs one expert at full width, so a sequence of m tokens costs S/m of
    the dense FFN's FLOPs (experts as wide as the dense FFN, as MoELayer sizes them for Soft
    MoE). By default (`slots_per_expert=None`, with the model's `num_positions` m known) p =
    ⌈m / E⌉, so S ≥ m and Soft MoE runs at the dense FFN's compute; fewer slots run at S/m of it."""

    kind = "soft"
    supported_losses = frozenset()
    causal_safe = False  # every slot mixes every token of the sequence

    def __init__(self, d_model: int, num_experts: int, slots_per_expert: int | None = None, num_slots: int | None = None,
                 num_positions: int | None = None) -> None:
        super().__init__()
        check_num_experts(num_experts)
        if num_slots is not None:
            if slots_per_expert is not None:
                raise ConfigError("set router.num_slots or router.slots_per_expert, not both")
            if num_slots < num_experts or num_slots % num_experts:
                raise ConfigError(f"router.num_slots={num_slots} must be a positive multiple of experts={num_experts}")
            slots_per_expert = num_slots // num_experts
        if slots_per_expert is None:  # equal compute with the dense FFN: a slot per token
            slots_per_expert = math.ceil(num_positions / num_experts) if num_positions else 1
        if isinstance(slots_per_expert, bool) or not isinstance(slots_per_expert, int) or slots_per_expert < 1:
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
    reads the mean of a group of inputs x̄, p = softmax(x̄ W_gᵀ), and the layer runs one FFN
    whose parameters are Σ_i p_i W_i (for every weight and bias of the experts), and the
    router gets gradients through the merged weights, with no estimator. The groups:

    - `per="sequence"` (the paper's): each sequence's mean routes the whole sequence. It
      mixes later tokens into the routing of earlier ones: not causal-safe, so the causal LM
      refuses it. Cost: one FFN per token plus one merge per sequence.
    - `per="segment"` (Lory, Zhong et al. 2024, causal segment routing): a sequence is cut
      into segments of `segment_length` tokens, and segment s runs the FFN merged with the
      routing of segment s−1's mean, so no token sees a later one; the first segment, with
      nothing before it, runs the even merge (p = 1/E). Cost: one FFN per token plus one
      merge per segment.
    - `per="token"`: each token's own x. Causal-safe, but the merge is per token: computed as
      Σ_i p_i (x W_i), every expert's projections run for every token, about E FFNs of
      FLOPs per token (`expert_passes_per_token` = E), though its active width is one FFN's.

    Initialisation: MoELayer draws each expert's weights sqrt(E) wider than one FFN's, so the
    merged FFN starts at the dense FFN's scale (at even p, Σ_i p_i W_i has std σ/sqrt(E))."""

    kind = "smear"
    expert_rows = ("gate.weight",)
    supported_losses = frozenset({"zloss", "entropy"})
    experts_per_token = 1  # the merged FFN's width is one expert's

    def __init__(self, d_model: int, num_experts: int, per: str = "sequence", segment_length: int = 32) -> None:
        super().__init__()
        check_num_experts(num_experts)
        if per not in ("sequence", "segment", "token"):
            raise ConfigError(f"router.per={per!r}: SMEAR merges the experts per sequence, segment or token")
        if isinstance(segment_length, bool) or not isinstance(segment_length, int) or segment_length < 1:
            raise ConfigError(f"router.segment_length={segment_length!r} must be a whole number >= 1")
        self.num_experts, self.per, self.segment_length = num_experts, per, segment_length
        self.causal_safe = per in ("token", "segment")
        self.gate = linear_gate(d_model, num_experts)

    @property
    def expert_passes_per_token(self) -> int:
        """Expert FFNs of compute per token: E for the per-token merge, else 1."""
        return self.num_experts if self.per == "token" else 1

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
        if self.per == "sequence":
            logits_BE = router_logits(x_BLD.float().mean(1), self.gate.weight)
            probs_BE = logits_BE.softmax(dim=-1)
            seq_len = x_BLD.shape[1]
            return MergedRouting(logits_BE.repeat_interleave(seq_len, 0), probs_BE.repeat_interleave(seq_len, 0), probs_BE,
                                 per_token=False, context=context)
        seq_len, length = x_BLD.shape[1], self.segment_length
        if seq_len % length:
            raise ConfigError(f"router.segment_length={length} must divide the sequence length {seq_len}")
        segments = seq_len // length
        means_BSD = x_BLD.float().reshape(num_sequences, segments, length, -1).mean(2)
        logits_BSE = router_logits(means_BSD.flatten(0, 1), self.gate.weight).reshape(num_sequences, segments, -1)
        # Segment s is routed by segment s−1; the first by nothing (even merge, logits 0).
        logits_BSE = torch.cat([torch.zeros_like(logits_BSE[:, :1]), logits_BSE[:, :-1]], dim=1)
        probs_GE = logits_BSE.flatten(0, 1).softmax(dim=-1)
        logits_GE = logits_BSE.flatten(0, 1)
        return MergedRouting(logits_GE.repeat_interleave(length, 0), probs_GE.repeat_interleave(length, 0), probs_GE,
                             per_token=False, context=context)

    def extra_repr(self) -> str:
        segment = f", segment_length={self.segment_length}" if self.per == "segment" else ""
        return f"experts={self.num_experts}, per={self.per}{segment}"
