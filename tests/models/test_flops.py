"""FLOPs counted on one forward (moelab.models.flops) against the formulas written out here:
the grouped matmul's count, and each arm's FFN FLOPs per token relative to its dense twin
for routers and expert kinds of both models (the number the studies state)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from moelab.models.flops import forward_flops, ffn_flops_ratio
from moelab.moe import GroupedExperts, MoELayer, TopKRouter

from ..conftest import compose_config


def test_the_grouped_matmul_counts_2_n_d_f_per_weight():
    layer = MoELayer(16, 32, partial(TopKRouter, k=2), partial(GroupedExperts, num_experts=4, activation="swiglu"))

    class Wrapper(torch.nn.Module):  # forward_flops sums modules named ffn/mlp
        def __init__(self):
            super().__init__()
            self.ffn = layer

        def forward(self, x):
            return self.ffn(x)

    counted = forward_flops(Wrapper(), torch.randn(3, 10, 16))
    rows = 30 * 2  # T tokens × k
    assert counted["ffn"] == rows * 2 * 16 * 32 * 3 + 30 * 2 * 16 * 4  # three expert matrices + router logits


def ratio(*overrides: str) -> float:
    return ffn_flops_ratio(compose_config(Path("unused"), *overrides))["ffn"]


def test_the_default_vit_and_lm_arms_cost_their_dense_twins_plus_the_router():
    D, H, E = 64, 128, 8  # the ViT: 4 blocks, MoE in 2, GELU experts H/2 wide, top-2
    dense = 2 * 2 * D * H
    assert ratio() == pytest.approx((2 * dense + 2 * (dense + 2 * D * E)) / (4 * dense))
    D, H = 128, 384  # lm_pystdlib: SwiGLU dense FFN and experts
    dense = 2 * 3 * D * H
    assert ratio("experiment=lm_pystdlib") == pytest.approx((2 * dense + 2 * (dense + 2 * D * E)) / (4 * dense))


@pytest.mark.parametrize("overrides,low,high", [
    (("expert=swiglu",), 0.97, 1.02),  # gated experts beside the ViT's GELU MLP: sized for equal FLOPs, not width
    (("router=expert_choice",), 1.0, 1.03),
    (("router=hash",), 0.999, 1.001),
    (("router=soft",), 1.0, 1.12),  # a slot per token by default, plus the slot mixing
    (("router=soft", "model.patch_size=1", "router.slots_per_expert=1"), 0.5, 0.7),  # 8 slots for 64 tokens
    (("router=switch",), 1.10, 1.16),  # capacity factor 1.25: padded buffers run in full
    (("experiment=lm_pystdlib", "router=smear", "router.per=token"), 4.3, 4.7),  # ≈ (1 + E) / 2: every expert per token
    (("experiment=lm_pystdlib", "router=smear", "router.per=segment"), 1.0, 1.2),  # one merge per segment
])
def test_each_arms_ratio_is_what_its_router_and_experts_cost(overrides, low, high):
    assert low <= ratio(*overrides) <= high
