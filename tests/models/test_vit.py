"""MoE placement in the ViT and its forward/backward."""

from functools import partial

import pytest
import torch

from moelab.models.placement import moe_layer_indices
from moelab.models.vit import MoEViT
from moelab.moe import ConfigError, GroupedExperts, MoELayer, TopKRouter


@pytest.mark.parametrize(
    "depth,every,layers,expected",
    [
        (4, 2, None, [1, 3]),
        (6, 3, None, [2, 5]),
        (4, 1, None, [0, 1, 2, 3]),
        (4, 0, None, []),
        (4, 2, [0, -1], [0, 3]),
    ],
)
def test_moe_layer_indices(depth, every, layers, expected):
    assert moe_layer_indices(depth, every, layers) == expected


def test_moe_layer_outside_model_is_rejected():
    with pytest.raises(ConfigError, match="model.moe_layers has 4, outside a model of depth 4"):
        moe_layer_indices(4, 2, [1, 4])


def make_vit(**kwargs):
    return MoEViT(
        router=partial(TopKRouter, num_experts=4, k=2),
        expert=partial(GroupedExperts, num_experts=4),
        aux_loss_weights={"balance": 0.01},
        **kwargs,
    )


def test_vit_has_moe_mlps_where_asked_and_trains_end_to_end():
    model = make_vit(depth=4, moe_layers=[0, 2])
    kinds = [type(block.mlp) for block in model.vit.blocks]
    assert [k is MoELayer for k in kinds] == [True, False, True, False]
    assert [block.mlp.layer_index for i, block in enumerate(model.vit.blocks) if i in (0, 2)] == [0, 2]
    images = torch.randn(5, 1, 8, 8)
    logits = model(images)
    assert logits.shape == (5, 10)
    # Each MoE layer saw every patch token of every image.
    assert model.vit.blocks[0].mlp.last_plan.num_tokens == 5 * model.num_patches
    logits.sum().backward()
    assert model.vit.blocks[2].mlp.router.gate.weight.grad.abs().sum() > 0


def test_dense_vit_has_no_moe_layer():
    model = make_vit(moe_every=0)
    assert not any(isinstance(m, MoELayer) for m in model.modules())
