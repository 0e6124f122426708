"""Sparse upcycling (Komatsuzaki et al. 2023): MoE layers whose experts start as copies of
a trained dense FFN, so training continues from the dense model instead of from scratch.

Expert widths decide the construction:

- Copies (expert width f equal to the dense width H, granularity 1): every expert gets
  the dense FFN. With a router whose weights sum to 1 over a token's experts (top-k with
  `normalize=True`, dense gating, Soft MoE's combine), the layer computes exactly the
  dense FFN: Σᵢ gᵢ FFN(x) = FFN(x). Shared experts (DeepSeekMoE) are copies too, and every
  output projection is scaled by 1/(1 + s) so that s shared copies plus the routed mixture
  still sum to FFN(x).
- A fine-grained split (f < H, f dividing H: DeepSeekMoE's granularity, or experts
  narrower than the dense FFN): the dense hidden units are cut into n = H / f slices.
  The s shared experts take the first s slices, and routed fine expert i takes slice
  s + (i mod (n − s)), its output projection scaled by E / (number of experts holding that
  slice), n − s when they divide evenly. A router that picks experts uniformly then gives
  FFN(x) in expectation: every slice once, from the shared experts or, on average, from
  the routed ones. It is not exact for a given token.

The router starts at zero (every expert equally likely, so the copies are used evenly)
or from N(0, router_std²). `noise` adds N(0, (noise · std(W))²) to each copied weight so
that experts can drift apart (Komatsuzaki et al. found no need for it; it is off by default).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.moe.errors import ConfigError
from moelab.moe.layer import MoELayer

__all__ = ["DenseWeights", "upcycle_layer"]


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
def upcycle_layer(layer: MoELayer, dense: DenseWeights, noise: float = 0.0, router_std: float = 0.0,
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
    """Zero (or draw from N(0, std²)) the router's gate, so experts start equally likely.
    Routers without a linear gate (hash, cosine's projection) keep their own start."""
    gate = getattr(router, "gate", None)
    if not isinstance(gate, nn.Linear):
        return
    if std:
        gate.weight.copy_(std * torch.randn(gate.weight.shape, generator=generator, dtype=gate.weight.dtype))
    else:
        gate.weight.zero_()
    if gate.bias is not None:
        gate.bias.zero_()
