"""MoELayer: output equals the loop reference, gradients reach router and every expert."""

from functools import partial

import pytest
import torch

from moelab.moe import ConfigError, GroupedExperts, MoELayer, TopKRouter, collect_aux_losses

from .test_dispatch import reference_moe


def make_layer(k=2, experts=4, activation="gelu", **router_kwargs):
    return MoELayer(
        d_model=16,
        hidden=32,
        router=partial(TopKRouter, num_experts=experts, k=k, **router_kwargs),
        experts=partial(GroupedExperts, num_experts=experts, activation=activation),
        aux_loss_weights={"balance": 0.01, "zloss": 0.001},
    )


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_layer_matches_loop_reference_on_3d_input(activation):
    layer = make_layer(activation=activation)
    x = torch.randn(3, 10, 16)
    y = layer(x)
    want, _ = reference_moe(layer.router, layer.experts, x.reshape(-1, 16))
    torch.testing.assert_close(y, want.reshape(3, 10, 16), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k,normalize", [(2, True), (1, False)])
def test_gradients_reach_router_and_every_expert(k, normalize):
    layer = make_layer(k=k, normalize=normalize)
    x = torch.randn(4, 32, 16)
    y = layer(x)
    assert set(layer.last_plan.selected_experts_TK.unique().tolist()) == {0, 1, 2, 3}
    # Task loss only (no aux): the router must learn through the combine weights.
    (y.square().mean()).backward()
    gate_grad = layer.router.gate.weight.grad
    assert gate_grad is not None and gate_grad.abs().sum() > 0
    for name in ("w1_EDF", "w2_EFD"):
        grad = getattr(layer.experts, name).grad
        assert grad is not None
        assert (grad.flatten(1).abs().sum(1) > 0).all(), f"an expert got no gradient in {name}"


def test_aux_losses_are_collected_and_weighted():
    layers = torch.nn.Sequential(make_layer(), make_layer())
    layers(torch.randn(2, 8, 16))
    total, by_name = collect_aux_losses(layers)
    want = sum(0.01 * m.aux_losses["balance"] + 0.001 * m.aux_losses["zloss"] for m in layers)
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(by_name["balance"], (layers[0].aux_losses["balance"] + layers[1].aux_losses["balance"]) / 2)
    total.backward()
    assert layers[0].router.gate.weight.grad.abs().sum() > 0


def test_unknown_aux_loss_is_rejected():
    with pytest.raises(ConfigError, match="unknown auxiliary loss"):
        MoELayer(16, 32, partial(TopKRouter, num_experts=4), partial(GroupedExperts, num_experts=4), {"balanse": 1.0})


def test_router_takes_its_expert_count_from_the_experts():
    layer = MoELayer(16, 32, partial(TopKRouter, num_experts=4), partial(GroupedExperts, num_experts=8))
    assert layer.router.num_experts == layer.num_experts == 8


def test_fine_grained_experts_keep_active_parameters():
    coarse = MoELayer(16, 64, partial(TopKRouter, k=2), partial(GroupedExperts, num_experts=4))
    fine = MoELayer(16, 64, partial(TopKRouter, k=2), partial(GroupedExperts, num_experts=4, granularity=4))
    assert (fine.num_experts, fine.router.k, fine.experts.hidden) == (16, 8, 16)
    active = lambda layer: layer.router.k * layer.experts.hidden  # noqa: E731
    assert active(fine) == active(coarse)
    assert sum(p.numel() for p in fine.experts.parameters()) == sum(p.numel() for p in coarse.experts.parameters())
    fine(torch.randn(2, 8, 16)).sum().backward()


def test_granularity_must_divide_hidden():
    with pytest.raises(ConfigError, match="granularity=3 must be >= 1 and divide"):
        GroupedExperts(d_model=16, hidden=64, num_experts=4, granularity=3)


def test_unaligned_expert_sizes_are_rejected():
    with pytest.raises(ConfigError, match="divisible by 8"):
        GroupedExperts(d_model=12, hidden=32, num_experts=2)


def test_active_parameters_count_experts_per_token():
    from moelab.moe import DenseRouter, ExpertChoiceRouter
    from moelab.moe.routed import active_parameters

    def count(router):
        layer = MoELayer(16, 32, router, partial(GroupedExperts, num_experts=4))
        routed = sum(p.numel() for p in layer.experts.parameters())
        return active_parameters(layer), sum(p.numel() for p in layer.parameters()), routed

    active, total, routed = count(partial(TopKRouter, k=2))
    assert active == total - routed // 2
    active, total, routed = count(DenseRouter)
    assert active == total
    active, total, routed = count(partial(ExpertChoiceRouter, capacity_factor=1.0))
    assert active == total - routed * 3 // 4
