"""Token-choice plans move rows by gathers (`Routing.row_TK`): forward and backward must equal
the generic path, the index gather plus fp32 scatter-add, that every other plan uses."""

import dataclasses
from functools import partial

import pytest
import torch

from moelab.moe import DenseRouter, GroupedExperts, GShardRouter, MoELayer, NoisyTopKRouter, TopKRouter
from moelab.moe import routing
from moelab.moe.routing import Routing


@pytest.fixture(autouse=True)
def _gathers_on_the_cpu(monkeypatch):
    """The gather path is the accelerators' default; force it on the CPU, where it is tested."""
    monkeypatch.setattr(routing, "GATHER_ROWS", True)

ROUTERS = {
    "topk": partial(TopKRouter, k=2),
    "topk_k1": partial(TopKRouter, k=1, normalize=False),
    "capacity_tight": partial(TopKRouter, k=2, capacity_factor=0.5),
    "capacity_priority": partial(TopKRouter, k=2, capacity_factor=1.0, batch_priority=True),
    "switch": partial(TopKRouter, k=1, normalize=False, capacity_factor=1.25),
    "gshard": GShardRouter,
    "gshard_capacity": partial(GShardRouter, capacity_factor=1.0),
    "noisy_topk": NoisyTopKRouter,
    "dense": DenseRouter,
}


def run(layer: MoELayer, x: torch.Tensor, generic: bool, autocast: bool) -> tuple[torch.Tensor, dict]:
    """Output and gradients (input, router, experts) of dispatch → experts → combine."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1)  # the same noise / random second expert in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        x_TD = x.reshape(-1, x.shape[-1])
        plan: Routing = layer.router(x_TD)
        assert plan.row_TK is not None, "token-choice plans carry row_TK"
        if generic:
            plan = dataclasses.replace(plan, row_TK=None)
        x_in = x_TD.to(torch.bfloat16) if autocast else x_TD
        x_ND, sizes_E = plan.dispatch(x_in)
        y_TD = plan.combine(layer.experts(x_ND, sizes_E))
    weights = torch.randn_like(y_TD, dtype=torch.float32)
    (y_TD.float() * weights).sum().backward()
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters() if p.grad is not None})
    layer.zero_grad(set_to_none=True)
    return y_TD.float(), grads


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_gather_path_equals_scatter_path(name):
    torch.manual_seed(0)
    layer = MoELayer(16, 32, ROUTERS[name], partial(GroupedExperts, num_experts=4, activation="swiglu"))
    x = torch.randn(3, 10, 16)
    y_gather, g_gather = run(layer, x, generic=False, autocast=False)
    y_scatter, g_scatter = run(layer, x, generic=True, autocast=False)
    torch.testing.assert_close(y_gather, y_scatter, atol=1e-6, rtol=1e-5)
    assert g_gather.keys() == g_scatter.keys() and {"x", "router.gate.weight"} <= set(g_gather)
    for key in g_gather:
        torch.testing.assert_close(g_gather[key], g_scatter[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["topk", "capacity_tight", "gshard"])
def test_gather_path_in_bf16_stays_close_to_fp32(name):
    """Under autocast the combine weights and rows are bf16 (fp32 accumulation in the
    matmul): within bf16 rounding of the generic fp32-accumulating path."""
    torch.manual_seed(0)
    layer = MoELayer(16, 32, ROUTERS[name], partial(GroupedExperts, num_experts=4, activation="swiglu"))
    x = torch.randn(3, 10, 16)
    y_gather, g_gather = run(layer, x, generic=False, autocast=True)
    y_scatter, g_scatter = run(layer, x, generic=True, autocast=True)
    scale = y_scatter.abs().max()
    assert (y_gather - y_scatter).abs().max() <= 2e-2 * scale
    for key in g_gather:
        err = (g_gather[key] - g_scatter[key]).abs().max()
        assert err <= 3e-2 * g_scatter[key].abs().max(), key


def test_dropped_choices_get_no_output_and_no_gradient():
    """Capacity 0.25 drops most choices: dropped ones must add nothing to the output and
    send no gradient to the row they are pointed at."""
    torch.manual_seed(0)
    layer = MoELayer(8, 16, partial(TopKRouter, k=2, capacity_factor=0.25), partial(GroupedExperts, num_experts=4))
    x = torch.randn(1, 16, 8)
    plan = layer.router(x.reshape(-1, 8))
    rows = plan.token_index_N.numel()
    assert bool((plan.row_TK == rows).any()), "the test needs dropped choices"
    y_ND = torch.randn(rows, 8, requires_grad=True)
    out_TD = plan.combine(y_ND)
    reference = torch.zeros(16, 8).index_add(0, plan.token_index_N, y_ND.detach() * plan.combine_weight_N[:, None])
    torch.testing.assert_close(out_TD.detach(), reference)
    out_TD.sum().backward()
    expected = plan.combine_weight_N.detach()[:, None].expand(-1, 8)
    torch.testing.assert_close(y_ND.grad, expected)
