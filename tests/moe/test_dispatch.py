"""Dispatch (dropless and capacity) and grouped experts against per-expert loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from moelab.moe import GroupedExperts, TopKRouter
from moelab.moe.dispatch import expert_capacity, grouped_mm, token_choice_routing


def loop_experts(experts: GroupedExperts, x_TD: torch.Tensor, expert_index: int) -> torch.Tensor:
    """One expert applied with plain matmuls (the test reference for the grouped path)."""
    h = x_TD @ experts.w1_EDF[expert_index]
    if experts.activation == "gelu":
        h = F.gelu(h)
    else:
        h = F.silu(h) * (x_TD @ experts.w3_EDF[expert_index])
    return h @ experts.w2_EFD[expert_index]


def reference_moe(router, experts, x_TD, capacity=None):
    """litgpt-style: for each expert, mask its tokens, run it, add weighted outputs.
    Capacity: walk assignments choice-major, first come first served per expert."""
    plan_choices = router(x_TD)  # only used for the selections and probabilities
    probs = plan_choices.router_probs_TE
    sel = plan_choices.selected_experts_TK
    weights = probs.gather(1, sel)
    if router.normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    T, K = sel.shape
    keep = torch.ones(T, K, dtype=torch.bool)
    if capacity is not None:
        used = [0] * router.num_experts
        for j in range(K):
            for t in range(T):
                e = sel[t, j].item()
                keep[t, j] = used[e] < capacity
                used[e] += 1
    out = torch.zeros_like(x_TD)
    for e in range(router.num_experts):
        for j in range(K):
            mask = (sel[:, j] == e) & keep[:, j]
            if mask.any():
                out[mask] += weights[mask, j, None] * loop_experts(experts, x_TD[mask], e)
    return out, keep


def run_layer(router, experts, x_TD):
    plan = router(x_TD)
    x_ND, sizes = plan.dispatch(x_TD)
    return plan.combine(experts(x_ND, sizes)), plan


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_experts_match_per_expert_loop(activation):
    experts = GroupedExperts(d_model=16, hidden=32, num_experts=5, activation=activation)
    sizes = torch.tensor([3, 0, 7, 1, 9])
    x = torch.randn(int(sizes.sum()), 16)
    got = experts(x, sizes)
    bounds = [0, *torch.cumsum(sizes, 0).tolist()]
    want = torch.cat([loop_experts(experts, x[a:b], e) for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_grouped_mm_backward_accepts_broadcast_gradients():
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(2, 8, 8, requires_grad=True)
    grouped_mm(x, w, torch.tensor([2, 6], dtype=torch.int32)).sum().backward()
    torch.testing.assert_close(w.grad[0], x[:2].detach().t() @ torch.ones(2, 8))


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_processes_every_token(k):
    router = TopKRouter(d_model=16, num_experts=4, k=k, normalize=k > 1)
    experts = GroupedExperts(d_model=16, hidden=16, num_experts=4)
    x = torch.randn(50, 16)
    y, plan = run_layer(router, experts, x)
    assert plan.group_sizes_E.sum() == 50 * k
    assert torch.equal(torch.bincount(plan.token_index_N, minlength=50), torch.full((50,), k))
    assert plan.stats()["dropped_fraction"] == 0
    want, _ = reference_moe(router, experts, x)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k,factor", [(1, 1.0), (2, 0.5), (2, 1.25)])
def test_capacity_drops_exactly_the_overflow(k, factor):
    num_experts, T = 4, 64
    router = TopKRouter(d_model=16, num_experts=num_experts, k=k, normalize=k > 1, capacity_factor=factor)
    # Skew the router so some experts overflow.
    with torch.no_grad():
        router.gate.weight[0] += 0.5
    experts = GroupedExperts(d_model=16, hidden=16, num_experts=num_experts)
    x = torch.randn(T, 16) + 0.5
    y, plan = run_layer(router, experts, x)
    capacity = math.ceil(factor * k * T / num_experts)
    demand = torch.bincount(plan.selected_experts_TK.flatten(), minlength=num_experts)
    assert demand.max() > capacity, "the test needs an overflowing expert"
    assert torch.equal(plan.tokens_per_expert_E, demand.clamp(max=capacity))
    assert torch.equal(plan.group_sizes_E, torch.full((num_experts,), capacity))
    want, keep = reference_moe(router, experts, x, capacity=capacity)
    assert torch.equal(plan.kept_TK, keep)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    # A token with every choice dropped gets exactly zero from the MoE (the residual carries it).
    fully_dropped = ~keep.any(1)
    assert torch.all(y[fully_dropped] == 0)
    expected_drop = 1 - plan.tokens_per_expert_E.sum().item() / (T * k)
    assert plan.stats()["dropped_fraction"].item() == pytest.approx(expected_drop)
    assert plan.stats()["unrouted_fraction"].item() == pytest.approx(fully_dropped.float().mean().item())
    # The per-token expert shares count exactly the kept (token, expert) pairs.
    share = plan.expert_share_TE()
    for t in range(T):
        for j in range(k):
            assert share[t, plan.selected_experts_TK[t, j]] >= int(keep[t, j])
    assert torch.equal(share.sum(1), keep.sum(1).float())
    assert torch.equal(share.sum(0), plan.tokens_per_expert_E.float())


def test_capacity_prefers_first_choices_over_second_choices():
    # Two tokens, both pick expert 0: token 1 first, token 0 second. Capacity 1 keeps token 1.
    logits = torch.zeros(2, 2)
    sel = torch.tensor([[1, 0], [0, 1]])
    w = torch.full((2, 2), 0.5)
    plan = token_choice_routing(logits, logits.softmax(-1), sel, w, capacity=1)
    assert plan.kept_TK.tolist() == [[True, False], [True, False]]


def test_expert_capacity_formula():
    assert expert_capacity(100, 8, 2, 1.25) == math.ceil(1.25 * 2 * 100 / 8)
    assert expert_capacity(10, 3, 1, 1.0) == 4


def test_geglu_and_shared_experts_match_loops():
    experts = GroupedExperts(d_model=8, hidden=32, num_experts=2, activation="geglu", granularity=2, num_shared=1)
    assert experts.num_experts == 4 and experts.hidden == 16
    sizes = torch.tensor([2, 0, 3, 1])
    x = torch.randn(6, 8)
    bounds = [0, 2, 2, 5, 6]
    want = torch.cat(
        [
            (F.gelu(x[a:b] @ experts.w1_EDF[e]) * (x[a:b] @ experts.w3_EDF[e])) @ experts.w2_EFD[e]
            for e, (a, b) in enumerate(zip(bounds, bounds[1:]))
        ]
    )
    torch.testing.assert_close(experts(x, sizes), want, atol=1e-5, rtol=1e-5)
    shared_experts = experts.make_shared_experts()
    assert shared_experts.w1_DH.shape == (8, 16)
    shared = (F.gelu(x @ shared_experts.w1_DH) * (x @ shared_experts.w3_DH)) @ shared_experts.w2_HD
    torch.testing.assert_close(shared_experts(x), shared)


def test_shared_experts_are_added_to_every_token():
    from functools import partial

    from moelab.moe import MoELayer

    layer = MoELayer(8, 16, partial(TopKRouter, k=3, normalize=False), partial(GroupedExperts, num_experts=4, num_shared=2))
    assert layer.router.k == 1  # DeepSeekMoE: k counts the shared experts too
    x = torch.randn(5, 8)
    routed, _ = reference_moe(layer.router, layer.experts, x)
    assert layer.shared_experts.w1_DH.shape == (8, 2 * 16)
    torch.testing.assert_close(layer(x), routed + layer.shared_experts(x), atol=1e-5, rtol=1e-5)


def test_expert_dropout_only_in_training():
    experts = GroupedExperts(d_model=8, hidden=16, num_experts=2, dropout=0.5)
    x, sizes = torch.randn(6, 8), torch.tensor([3, 3])
    assert not torch.allclose(experts(x, sizes), experts(x, sizes))
    experts.eval()
    torch.testing.assert_close(experts(x, sizes), experts(x, sizes))
