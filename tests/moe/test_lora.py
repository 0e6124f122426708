"""LoRA-MoE experts: each expert is the base FFN plus its own low-rank adapters, computed
in grouped form; at init every expert is the base FFN."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from moelab.moe import ConfigError, GShardRouter, LoRAExperts, MoELayer, TopKRouter
from moelab.moe.routers import AuxFreeRouter, CosineRouter, DenseRouter, HashRouter, NoisyTopKRouter


def lora_reference(experts: LoRAExperts, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e with its adapted weights written out: W + (α/r) A_e B_e for each projection."""
    base, s = experts.base, experts.scale
    w1 = base.w1_DH + s * experts.a1_EDR[e] @ experts.b1_ERF[e]
    w3 = base.w3_DH + s * experts.a3_EDR[e] @ experts.b3_ERF[e]
    w2 = base.w2_HD + s * experts.a2_EFR[e] @ experts.b2_ERD[e]
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def test_each_expert_is_the_base_plus_its_adapters():
    torch.manual_seed(0)
    experts = LoRAExperts(d_model=16, hidden=32, num_experts=3, rank=8, alpha=4.0)
    with torch.no_grad():
        for b in (experts.b1_ERF, experts.b3_ERF, experts.b2_ERD):
            b.normal_()  # adapters that do something
    x = torch.randn(6, 16)
    sizes = torch.tensor([1, 3, 2])
    rows = [0, 1, 1, 1, 2, 2]
    expected = torch.stack([lora_reference(experts, x[n], e) for n, e in enumerate(rows)])
    torch.testing.assert_close(experts(x, sizes), expected, atol=1e-5, rtol=1e-4)


ROUTERS = {
    "topk": functools.partial(TopKRouter, k=2),
    "gshard_dropless": functools.partial(GShardRouter, capacity_factor=None, eval_capacity_factor=None),
    "noisy_topk": NoisyTopKRouter,
    "cosine": CosineRouter,
    "aux_free": AuxFreeRouter,
    "hash": functools.partial(HashRouter, key="position", num_keys=8),
    "dense": DenseRouter,
}


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_at_init_the_layer_is_the_base_ffn_for_every_token_choice_router(name):
    torch.manual_seed(0)
    layer = MoELayer(16, 32, ROUTERS[name], functools.partial(LoRAExperts, num_experts=4))
    layer.eval()
    x = torch.randn(2, 8, 16)
    out = layer(x)
    base = layer.experts.base(x.reshape(-1, 16)).reshape(x.shape)
    # Normalised routers give the base FFN; GShard in eval uses its renormalised top-2 too.
    torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-4)


def test_parameters_are_the_base_plus_adapters_and_the_base_can_be_frozen():
    d, h, E, r = 16, 32, 4, 8
    experts = LoRAExperts(d_model=d, hidden=h, num_experts=E, rank=r, train_base=False)
    base = 3 * d * h
    adapters = E * r * (d + h) * 3
    assert sum(p.numel() for p in experts.parameters()) == base + adapters
    assert not any(p.requires_grad for p in experts.base.parameters())
    layer = MoELayer(d, h, functools.partial(TopKRouter, k=2), functools.partial(LoRAExperts, num_experts=E, train_base=False))
    layer.train()
    layer(torch.randn(2, 8, d)).square().mean().backward()
    assert all(p.grad is None for p in layer.experts.base.parameters())
    assert layer.experts.a1_EDR.grad is not None and layer.router.gate.weight.grad is not None
    with pytest.raises(ConfigError, match="expert.rank=4 must be a multiple of 8"):
        LoRAExperts(d_model=d, hidden=h, num_experts=E, rank=4)
