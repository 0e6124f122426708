"""TopKRouter against the top-k equations written out token by token."""

import math

import pytest
import torch

from moelab.moe import ConfigError, TopKRouter


def reference_topk(logits_TE: torch.Tensor, k: int, normalize: bool):
    """Per token: softmax by hand, choose the k largest by sorting a Python list."""
    choices, weights = [], []
    for row in logits_TE.tolist():
        exps = [math.exp(v - max(row)) for v in row]
        probs = [e / sum(exps) for e in exps]
        chosen = sorted(range(len(row)), key=lambda i: -probs[i])[:k]
        w = [probs[i] for i in chosen]
        if normalize:
            w = [v / sum(w) for v in w]
        choices.append(chosen)
        weights.append(w)
    return torch.tensor(choices), torch.tensor(weights, dtype=torch.float32)


@pytest.mark.parametrize("k,normalize", [(1, False), (2, True), (2, False), (3, True)])
def test_topk_weights_match_equation(k, normalize):
    router = TopKRouter(d_model=16, num_experts=6, k=k, normalize=normalize)
    x = torch.randn(40, 16)
    plan = router(x)
    logits = x @ router.gate.weight.t()
    ref_choice, ref_weight = reference_topk(logits, k, normalize)
    assert torch.equal(plan.selected_experts_TK, ref_choice)
    # Each token's k rows in the grouped buffer carry the reference weights.
    for t in range(x.shape[0]):
        rows = (plan.token_index_N == t).nonzero().flatten()
        experts_of_rows = torch.repeat_interleave(torch.arange(6), plan.group_sizes_E)[rows]
        got = dict(zip(experts_of_rows.tolist(), plan.combine_weight_N[rows].tolist()))
        want = dict(zip(ref_choice[t].tolist(), ref_weight[t].tolist()))
        assert got.keys() == want.keys()
        for e in want:
            assert got[e] == pytest.approx(want[e], abs=1e-5)


def test_normalized_topk_equals_softmax_over_selected_logits():
    router = TopKRouter(d_model=8, num_experts=8, k=2, normalize=True)
    x = torch.randn(30, 8)
    plan = router(x)
    logits = plan.router_logits_TE
    picked = logits.gather(1, plan.selected_experts_TK)
    expected_TK = picked.softmax(-1)
    weights_TK = torch.zeros_like(expected_TK)
    experts_N = torch.repeat_interleave(torch.arange(8), plan.group_sizes_E)
    for n in range(len(plan.token_index_N)):
        t = plan.token_index_N[n]
        slot = (plan.selected_experts_TK[t] == experts_N[n]).nonzero().item()
        weights_TK[t, slot] = plan.combine_weight_N[n]
    torch.testing.assert_close(weights_TK, expected_TK, atol=1e-6, rtol=1e-5)


def test_router_logits_are_fp32_under_bf16_autocast():
    """Under bf16 autocast the logits are the fp32 product x W_gᵀ, worked out here in float64,
    and pick the experts of the fp32 run. (A bf16 matmul cast back to fp32 has the right
    dtype, but its logits are ~1e-3 off and some tokens pick other experts.)"""
    router = TopKRouter(d_model=64, num_experts=8, k=2)
    x = torch.randn(256, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = router(x)
    assert plan.router_logits_TE.dtype == torch.float32
    expected = x.double() @ router.gate.weight.double().t()
    torch.testing.assert_close(plan.router_logits_TE.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(plan.selected_experts_TK, router(x).selected_experts_TK)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_experts=4, k=5), "router.k=5 must be between 1 and experts=4"),
        (dict(num_experts=0, k=1), "experts=0"),
        (dict(num_experts=4, k=2, capacity_factor=0.0), "capacity_factor=0.0 must be > 0"),
        (dict(num_experts=4, k=2, eval_capacity_factor=-1.0), "eval_capacity_factor=-1.0 must be > 0"),
        (dict(num_experts=4, k=1, normalize=True), "set router.normalize=false"),
    ],
)
def test_bad_router_config_messages(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        TopKRouter(d_model=8, **kwargs)
    assert "\n" not in str(info.value)
