"""Sparse upcycling (Komatsuzaki et al. 2023): MoE layers whose experts start as copies of
a trained dense FFN, so training continues from the dense model instead of from scratch.

Expert widths decide the construction:

- Copies (expert width f equal to the dense width H, granularity 1): every expert gets
  the dense FFN. With a router whose weights sum to 1 over a token's experts and which
  feeds each expert the token itself (top-k with `normalize=True` (also noisy, cosine,
  aux-free, Sinkhorn with k ≥ 2), dense gating, hash (weight 1), SMEAR (a convex mix of
  identical weights)), the layer computes exactly the dense FFN at step 0, whatever the
  router's start: Σᵢ gᵢ FFN(x) = FFN(x). Not exact: Switch top-1 and top-k with
  `normalize=false` scale the FFN by the chosen probabilities, about k/E at a small
  router init (1/E for Switch); expert choice gives a token the weights of the experts that
  picked it (any sum, 0 for a dropped token); Soft MoE feeds experts mixes of tokens, so
  FFN(mix) ≠ mix of FFN. Shared experts (DeepSeekMoE) are copies too, and every output
  projection is scaled by 1/(1 + s) so that s shared copies plus the routed mixture still
  sum to FFN(x).
- A fine-grained split (f < H, f dividing H: DeepSeekMoE's granularity, or experts
  narrower than the dense FFN): the dense hidden units are cut into n = H / f slices.
  The s shared experts take the first s slices, and routed fine expert i takes slice
  s + (i mod (n − s)), its output projection scaled by E / (number of experts holding that
  slice), n − s when they divide evenly. A router that picks experts uniformly then gives
  FFN(x) in expectation: every slice once, from the shared experts or, on average, from
  the routed ones. It is not exact for a given token.

The router's gate starts from N(0, router_std²), 0.02 by default (the paper initialises the
new router afresh). A zero router (router_std=0) is a trap: every logit ties, top-k breaks
the tie by index, so every token goes to the same k experts, and the task gradient of the
router is exactly zero there (the k copies are identical), so nothing breaks the tie but
the balance loss. `noise` adds N(0, (noise · std(W))²) to each copied weight so
that experts can drift apart (Komatsuzaki et al. found no need for it; it is off by default).

A whole model (`upcycle_model`) is upcycled from its dense twin's state dict, the same
model with `model.moe_every=0`: every block has a dense FFN there (moelab's `DenseFFN` in
the LM, timm's `Mlp` in the ViT). Everything outside the MoE layers is copied as is; each
MoE layer is filled by `upcycle_layer` from the dense FFN at its place.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from moelab.moe.errors import ConfigError
from moelab.moe.layer import MoELayer

__all__ = ["DenseWeights", "dense_ffn_weights", "upcycle_layer", "upcycle_model"]


class DenseWeights:
    """A dense FFN's weights in moelab's layout: W1/W3 (D, H), W2 (H, D), optional biases."""

    def __init__(self, w_in_DH: Tensor, w_out_HD: Tensor, w_gate_DH: Tensor | None = None,
                 b_in_H: Tensor | None = None, b_out_D: Tensor | None = None, b_gate_H: Tensor | None = None) -> None:
        self.w_in_DH, self.w_out_HD, self.w_gate_DH = w_in_DH, w_out_HD, w_gate_DH
        self.b_in_H, self.b_out_D, self.b_gate_H = b_in_H, b_out_D, b_gate_H

    @property
    def hidden(self) -> int:
        return self.w_in_DH.shape[1]


def _noisy(weight: Tensor, noise: float, generator: torch.Generator | None) -> Tensor:
    if not noise:
        return weight
    scale = noise * weight.float().std().clamp_min(1e-12)
    return weight + scale * torch.randn(weight.shape, generator=generator, dtype=weight.dtype, device=weight.device)


@torch.no_grad()
def upcycle_layer(layer: MoELayer, dense: DenseWeights, noise: float = 0.0, router_std: float = 0.02,
                  generator: torch.Generator | None = None) -> None:
    """Set `layer`'s experts (and shared experts) from the dense FFN `dense` and restart
    its router (module docstring). Refuses, in one line, what cannot be built."""
    experts = layer.experts
    if not hasattr(experts, "w1_EDF"):
        raise ConfigError(f"upcycling fills grouped experts; {type(experts).__name__} has none")
    D, H = dense.w_in_DH.shape
    f, s = experts.hidden, experts.num_shared
    if D != experts.d_model:
        raise ConfigError(f"the dense FFN is {D} wide, the MoE layer {experts.d_model}: not the same backbone")
    if (dense.w_gate_DH is None) != (experts.w3_EDF is None):
        have = "a gated (SwiGLU/GeGLU)" if dense.w_gate_DH is not None else "a plain GELU"
        raise ConfigError(f"the dense model has {have} FFN; pick the expert kind with the same activation")
    if (dense.b_in_H is not None) and experts.b1_EF is None:
        raise ConfigError("the dense FFN has biases (timm's MLP): upcycle into experts with expert.bias=true")
    if H % f:
        raise ConfigError(f"expert width {f} does not divide the dense FFN's width {H}: use model.expert_hidden=dense "
                          f"(copies) or a width that splits {H} into equal slices")
    slices = H // f
    if slices > 1 and s >= slices:
        raise ConfigError(f"{s} shared experts would take all {slices} slices of the dense FFN: nothing left to route")

    def part(weight: Tensor | None, index: int, dim: int) -> Tensor | None:
        return None if weight is None else weight.narrow(dim, index * f, f)

    E = experts.num_experts
    routed_slices = slices - s if slices > 1 else 1
    slice_of = [0 if slices == 1 else s + e % routed_slices for e in range(E)]
    holders = [slice_of.count(j) for j in range(slices)]
    for e in range(E):
        j = slice_of[e]
        # Copies: 1/(1 + s) so s shared copies plus the routed mix sum to FFN(x). Split:
        # E / (experts holding slice j), so the mean over experts is every routed slice once.
        out_scale = 1.0 / (1 + s) if slices == 1 else E / holders[j]
        experts.w1_EDF[e].copy_(_noisy(part(dense.w_in_DH, j, 1), noise, generator))
        if experts.w3_EDF is not None:
            experts.w3_EDF[e].copy_(_noisy(part(dense.w_gate_DH, j, 1), noise, generator))
        experts.w2_EFD[e].copy_(_noisy(part(dense.w_out_HD, j, 0), noise, generator) * out_scale)
        if experts.b1_EF is not None:
            _copy_bias(experts.b1_EF[e], part(dense.b_in_H, j, 0))
            if experts.b3_EF is not None:
                _copy_bias(experts.b3_EF[e], part(dense.b_gate_H, j, 0))
            # Σ gᵢ = 1: each routed expert carries the output bias, shared ones none of it.
            _copy_bias(experts.b2_ED[e], None if dense.b_out_D is None else dense.b_out_D * (out_scale if slices == 1 else 1.0))

    shared = layer.shared_experts
    if shared is not None:
        # Copies: s whole FFNs side by side. Split: the first s slices.
        pieces = range(s) if slices > 1 else [0] * s
        width = f if slices > 1 else H

        def stack(weight: Tensor | None, dim: int) -> Tensor | None:
            if weight is None:
                return None
            return torch.cat([weight.narrow(dim, j * width, width) for j in pieces], dim=dim)

        scale = 1.0 / (1 + s) if slices == 1 else 1.0
        shared.w1_DH.copy_(_noisy(stack(dense.w_in_DH, 1), noise, generator))
        if shared.w3_DH is not None:
            shared.w3_DH.copy_(_noisy(stack(dense.w_gate_DH, 1), noise, generator))
        shared.w2_HD.copy_(_noisy(stack(dense.w_out_HD, 0), noise, generator) * scale)
        if shared.b1_H is not None:
            _copy_bias(shared.b1_H, stack(dense.b_in_H, 0))
            if shared.b3_H is not None:
                _copy_bias(shared.b3_H, stack(dense.b_gate_H, 0))
            b_out = None if dense.b_out_D is None or slices > 1 else dense.b_out_D * scale * s
            _copy_bias(shared.b2_D, b_out)

    restart_router(layer.router, router_std, generator)


def _copy_bias(target: Tensor, source: Tensor | None) -> None:
    if source is None:
        target.zero_()
    else:
        target.copy_(source)


@torch.no_grad()
def restart_router(router: nn.Module, std: float = 0.0, generator: torch.Generator | None = None) -> None:
    """Draw the router's gate from N(0, std²) (zero it for std=0), so experts start about
    equally likely. Routers without a linear gate (hash, cosine's projection) keep their own start."""
    gate = getattr(router, "gate", None)
    if not isinstance(gate, nn.Linear):
        return
    if std:
        gate.weight.copy_(std * torch.randn(gate.weight.shape, generator=generator, dtype=gate.weight.dtype))
    else:
        gate.weight.zero_()
    if gate.bias is not None:
        gate.bias.zero_()


def dense_ffn_weights(state: Mapping[str, Tensor], prefix: str) -> DenseWeights | None:
    """The dense FFN stored under `prefix` in a state dict, in moelab's layout, or None."""
    get = lambda name: state.get(f"{prefix}.{name}")  # noqa: E731
    if get("w1_DH") is not None:
        return DenseWeights(get("w1_DH"), get("w2_HD"), get("w3_DH"), get("b1_H"), get("b2_D"), get("b3_H"))
    if get("fc1.weight") is not None:  # timm's Mlp: fc1 (H, D), fc2 (D, H), GELU
        return DenseWeights(get("fc1.weight").t(), get("fc2.weight").t(), None, get("fc1.bias"), get("fc2.bias"))
    return None


def upcycle_model(model: nn.Module, dense_state: Mapping[str, Tensor], noise: float = 0.0,
                  router_std: float = 0.02, seed: int = 0) -> list[str]:
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
