"""The MoE layer's hot path has static shapes and no host synchronisation: every router
(but Sinkhorn, whose tolerance check reads a value) traces into one graph with
`torch.compile(fullgraph=True)`, which fails on `.item()`, `.tolist()`, `nonzero` and other
data-dependent shapes. (bf16: the grouped-matmul tracing rule accepts bf16 only.)"""

from functools import partial

import pytest
import torch

from moelab.moe import (
    AuxFreeRouter,
    CosineRouter,
    DenseRouter,
    ExpertChoiceRouter,
    GroupedExperts,
    GShardRouter,
    HashRouter,
    MoELayer,
    NoisyTopKRouter,
    SoftMoERouter,
    TopKRouter,
)

ROUTERS = {
    "topk": partial(TopKRouter, k=2),
    "topk_capacity_priority": partial(TopKRouter, k=2, capacity_factor=1.0, batch_priority=True),
    "topk_fine_shared": partial(TopKRouter, k=2),  # DeepSeekMoE: granularity 2, one shared expert
    "switch": partial(TopKRouter, k=1, normalize=False, capacity_factor=1.25),
    "gshard": GShardRouter,
    "noisy_topk": NoisyTopKRouter,
    "cosine": CosineRouter,
    "aux_free": AuxFreeRouter,
    "hash": partial(HashRouter, key="position", num_keys=8),
    "dense": DenseRouter,
    "expert_choice": ExpertChoiceRouter,
    "soft": SoftMoERouter,
}


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_layer_compiles_to_one_graph(name):
    fine_shared = {"granularity": 2, "num_shared": 1} if name == "topk_fine_shared" else {}
    layer = MoELayer(16, 32, ROUTERS[name], partial(GroupedExperts, num_experts=4, **fine_shared), {"zloss": 1e-3})
    x = torch.randn(2, 8, 16, requires_grad=True)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compiled(x)
        out.float().sum().backward()
    finally:
        torch._dynamo.reset()
    assert x.grad is not None and torch.isfinite(x.grad).all()
