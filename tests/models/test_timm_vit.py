"""model.timm_name: any timm vision transformer with MoE MLPs, and model.pretrained's
upcycling from timm's MLPs (Mlp and SwiGLU) checked against the MLP itself. Nothing here
downloads: a failing hub is simulated."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from timm.layers import Mlp, SwiGLU

from moelab.models.build import build_model
from moelab.models.vit import timm_mlp_weights
from moelab.moe import GroupedExperts, MoELayer, TopKRouter
from moelab.moe.lifecycle.upcycle import upcycle_layer
from moelab.moe.routed import moe_layers
from moelab.run.train import run

from ..conftest import VIT_FAST, compose_config, one_line_error
from ..data.test_images import FAST_IMAGES, write_cifar


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
def test_experts_upcycled_from_a_timm_mlp_compute_that_mlp(kind):
    torch.manual_seed(0)
    mlp = Mlp(16, 48) if kind == "mlp" else SwiGLU(16, 48)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    router = functools.partial(TopKRouter, k=2, normalize=True)
    experts = functools.partial(GroupedExperts, num_experts=4, activation="gelu" if kind == "mlp" else "swiglu", bias=True)
    layer = MoELayer(16, 48, router, experts)
    upcycle_layer(layer, timm_mlp_weights(mlp, 0))
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(layer(x), mlp(x), atol=1e-5, rtol=1e-5)


def test_a_timm_vit_by_name_gets_moe_mlps_and_trains(tmp_path):
    root = write_cifar(tmp_path / "data")
    cfg = compose_config(tmp_path / "run", *VIT_FAST, "data=cifar10", f"data.root={root}", *FAST_IMAGES,
                         "model.timm_name=vit_tiny_patch16_224", "model.moe_last=2")
    model = build_model(cfg)
    assert len(model.vit.blocks) == 12 and model.moe_indices == [9, 11]
    assert [layer.experts.d_model for layer in moe_layers(model)] == [192, 192]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    run(cfg)


def test_timm_mistakes_and_an_unreachable_hub_are_one_line(tmp_path, monkeypatch):
    line = one_line_error(compose_config(tmp_path / "a", *VIT_FAST, "model.timm_name=no_such_vit"))
    assert "model.timm_name=no_such_vit is not a timm model" in line
    line = one_line_error(compose_config(tmp_path / "b", *VIT_FAST, "model.pretrained=true"))
    assert "name the model with model.timm_name" in line
    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    line = one_line_error(compose_config(tmp_path / "c", *VIT_FAST, "model.timm_name=vit_tiny_patch16_224",
                                         "model.pretrained=true", "expert.bias=true"))
    assert "model.pretrained=true: vit_tiny_patch16_224's weights could not be loaded (OSError" in line
    assert "model.pretrained=false" in line
