"""Mixture of attention heads (model.attention=moa): the layer equals a loop over each token's
selected heads written out here, it is causal-safe in the LM, gradients reach every part,
and its routing shows in the statistics as layers of their own."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from moelab.callbacks.common import indexed_moe_layers
from moelab.models.lm import MoELM
from moelab.moe import ConfigError, ExpertChoiceRouter, GroupedExperts, TopKRouter
from moelab.moe.attention import MixtureOfAttention, matched_head_dim
from moelab.moe.routed import collect_aux_losses

D, E, K = 32, 4, 2


def rotate(v: torch.Tensor, position: int, base: float) -> torch.Tensor:
    """RoPE written out: pair (v_2i, v_2i+1) turned by position · base^(−2i/h)."""
    out = v.clone()
    for i in range(v.shape[-1] // 2):
        angle = position * base ** (-2 * i / v.shape[-1])
        c, s = math.cos(angle), math.sin(angle)
        out[..., 2 * i] = v[..., 2 * i] * c - v[..., 2 * i + 1] * s
        out[..., 2 * i + 1] = v[..., 2 * i] * s + v[..., 2 * i + 1] * c
    return out


def heads_by_loop(moa: MixtureOfAttention, x_BLD: torch.Tensor, causal: bool, base: float | None) -> torch.Tensor:
    """y_t = Σ over t's top-k experts e of g_e · W_o^eᵀ softmax(q_t^e · K_s / sqrt(h)) V, with
    g the softmax probabilities of the top-k renormalised, K and V shared."""
    B, L, _ = x_BLD.shape
    out = torch.zeros_like(x_BLD)
    wq, wo = moa.experts.w_q_EDH, moa.experts.w_o_EHD
    for b in range(B):
        keys = x_BLD[b] @ moa.w_k_DH
        values = x_BLD[b] @ moa.w_v_DH
        if base is not None:
            keys = torch.stack([rotate(keys[s], s, base) for s in range(L)])
        for t in range(L):
            probs = torch.softmax(x_BLD[b, t] @ moa.router.gate.weight.T, -1)
            top = probs.topk(K)
            gates = top.values / top.values.sum()
            visible = t + 1 if causal else L
            for g, e in zip(gates, top.indices.tolist()):
                q = x_BLD[b, t] @ wq[e]
                if base is not None:
                    q = rotate(q, t, base)
                attn = torch.softmax(keys[:visible] @ q / math.sqrt(q.shape[0]), -1)
                out[b, t] += g * (attn @ values[:visible]) @ wo[e]
    return out


@pytest.mark.parametrize("causal, base", [(True, 10000.0), (False, None)], ids=["causal_rope", "bidirectional"])
def test_the_layer_is_a_loop_over_each_tokens_selected_heads(causal, base):
    torch.manual_seed(0)
    moa = MixtureOfAttention(D, partial(TopKRouter, k=K), E, K, head_dim=16, causal=causal, rope_base=base,
                             aux_loss_weights={"balance": 0.01, "zloss": 1e-3})
    x = torch.randn(2, 7, D, requires_grad=True)
    y = moa(x)
    reference = heads_by_loop(moa, x, causal, base)
    torch.testing.assert_close(y, reference, atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad(y.square().sum() + moa.aux_loss,
                                [x, moa.router.gate.weight, moa.w_k_DH, moa.w_v_DH, moa.experts.w_q_EDH, moa.experts.w_o_EHD])
    assert all(g.abs().sum() > 0 for g in grads)
    used_E = moa.last_plan.tokens_per_expert_E > 0  # an expert's query and output learn from its tokens only
    assert torch.equal(grads[4].flatten(1).abs().sum(1) > 0, used_E) and torch.equal(grads[5].flatten(1).abs().sum(1) > 0, used_E)
    assert set(moa.aux_losses) == {"balance", "zloss"}


def test_the_lm_with_moa_is_causal_safe_and_counts_equal_projection_flops():
    torch.manual_seed(0)
    model = MoELM(partial(TopKRouter, k=2), partial(GroupedExperts, num_experts=4, activation="swiglu"), {"balance": 0.01},
                  d_model=32, depth=2, num_heads=2, ffn_hidden=64, attention="moa", attention_experts=E).eval()
    ids = torch.randint(0, 256, (2, 12))
    later = ids.clone()
    later[:, 6:] = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :6], model(later)[:, :6])  # no future token leaks
    h = matched_head_dim(32, 2)
    assert h == 24 and model.blocks[0].attn.head_dim == h  # 2·D·h·(1 + k) ≈ 4·D²: 4608 vs 4096 multiply-adds
    indices = [index for index, _ in indexed_moe_layers(model)]
    assert indices == ["0/attn", "1/attn", 1]  # attention mixtures are layers of their own: moe/layer0/attn/...
    model.train()
    model(ids)
    total, by_name = collect_aux_losses(model)
    assert total is not None and "balance" in by_name  # the attention routers train with the same losses


def test_moa_needs_a_token_choice_router_and_causal_routing():
    with pytest.raises(ConfigError, match="needs a token-choice router .* not ExpertChoiceRouter"):
        MixtureOfAttention(D, ExpertChoiceRouter, E, K)
    with pytest.raises(ConfigError, match="attention-head mixture of block 0"):
        MoELM(partial(TopKRouter, k=2, capacity_factor=1.0), partial(GroupedExperts, num_experts=4), d_model=32, depth=2,
              num_heads=2, ffn_hidden=64, moe_every=0, attention="moa", attention_experts=E)
    with pytest.raises(ConfigError, match="model.attention='sparse'"):
        MoELM(partial(TopKRouter, k=2), partial(GroupedExperts, num_experts=4), d_model=32, depth=2, num_heads=2,
              ffn_hidden=64, attention="sparse")
