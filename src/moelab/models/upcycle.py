"""Build an MoE model from its dense twin's trained weights (sparse upcycling).

The dense twin is the same model with `model.moe_every=0`: every block has a dense FFN
(moelab's `DenseFFN` in the LM, timm's `Mlp` in the ViT). Everything outside the MoE
layers is copied as is; each MoE layer is filled from the dense FFN at its place by
`moelab.moe.upcycle.upcycle_layer`.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from moelab.moe.errors import ConfigError
from moelab.moe.layer import MoELayer
from moelab.moe.upcycle import DenseWeights, upcycle_layer


def dense_ffn_weights(state: Mapping[str, Tensor], prefix: str) -> DenseWeights | None:
    """The dense FFN stored under `prefix` in a state dict, in moelab's layout, or None."""
    get = lambda name: state.get(f"{prefix}.{name}")  # noqa: E731
    if get("w1_DH") is not None:
        return DenseWeights(get("w1_DH"), get("w2_HD"), get("w3_DH"), get("b1_H"), get("b2_D"), get("b3_H"))
    if get("fc1.weight") is not None:  # timm's Mlp: fc1 (H, D), fc2 (D, H), GELU
        return DenseWeights(get("fc1.weight").t(), get("fc2.weight").t(), None, get("fc1.bias"), get("fc2.bias"))
    return None


def upcycle_model(model: nn.Module, dense_state: Mapping[str, Tensor], noise: float = 0.0,
                  router_std: float = 0.0, seed: int = 0) -> list[str]:
    """Load `dense_state` (the dense twin's weights) into `model` and upcycle every MoE
    layer from the dense FFN at its place. Returns the upcycled layers' names."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, MoELayer)}
    if not layers:
        raise ConfigError("model.upcycle=true needs MoE layers to fill, and this model has none (model.moe_every=0?)")
    own = model.state_dict()
    inside = lambda key: any(key.startswith(f"{name}.") for name in layers)  # noqa: E731
    for name in layers:
        if dense_ffn_weights(dense_state, name) is None:
            kind = "an MoE model" if any(k.startswith(f"{name}.router") for k in dense_state) else "not this model"
            raise ConfigError(f"init_from has no dense FFN at {name} ({kind}): upcycle from a run of the same model "
                              "with model.moe_every=0")
    missing = [k for k in own if not inside(k) and k not in dense_state]
    unused = [k for k in dense_state if not inside(k) and k not in own]
    if missing or unused:
        example = missing[0] if missing else unused[0]
        raise ConfigError(f"init_from is not this model's dense twin ({len(missing)} weights missing, {len(unused)} "
                          f"extra, e.g. {example}): upcycle from a run of the same model with model.moe_every=0")
    for key in own:
        if not inside(key) and tuple(own[key].shape) != tuple(dense_state[key].shape):
            raise ConfigError(f"init_from's {key} is {tuple(dense_state[key].shape)}, this model's "
                              f"{tuple(own[key].shape)}: not the same backbone")
    model.load_state_dict({k: v for k, v in dense_state.items() if not inside(k)}, strict=False)
    generator = torch.Generator().manual_seed(seed)
    for name, layer in layers.items():
        upcycle_layer(layer, dense_ffn_weights(dense_state, name), noise, router_std, generator)
    return list(layers)
