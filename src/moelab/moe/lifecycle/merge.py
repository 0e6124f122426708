"""Merging a trained MoE layer's experts into fewer: weighted averages of expert weight
stacks, with the router's rows merged the same way.

Groups of experts become one expert each; within a group every weight (W1, W3, W2 and
biases) and every router row is the average of its members, weighted by each member's
share of the tokens (`usage`) or equally (`uniform`). `similarity` forms the groups by
agglomerating the most similar experts first (cosine similarity of their flattened
weights, usage-weighted means as groups grow); `uniform` and `usage` group neighbours
(experts 0..E/E'−1, ...). Averaging expert weights is the merge used for compressing
MoEs, e.g. "merge, then compress" (Li et al. 2023, MC-SMoE) and Switch's distillation
baselines; it is a one-shot approximation, evaluated by the caller.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from moelab.moe.errors import ConfigError
from moelab.moe.layer import MoELayer

METHODS = ("usage", "uniform", "similarity")


def expert_groups(layer: MoELayer, target: int, method: str, usage_E: Tensor) -> list[list[int]]:
    """Which experts become each of the `target` merged experts."""
    E = layer.num_experts
    if method not in METHODS:
        raise ConfigError(f"--method {method} is unknown: pick one of {', '.join(METHODS)}")
    if not 1 <= target <= E:
        raise ConfigError(f"--to {target} must be between 1 and the {E} experts the model has")
    if method in ("usage", "uniform"):
        if E % target:
            raise ConfigError(f"--method {method} merges neighbouring experts in equal groups: --to {target} must divide {E}")
        size = E // target
        return [list(range(g * size, (g + 1) * size)) for g in range(target)]
    flat_EP = torch.cat([w.detach().reshape(E, -1).float() for w in layer.experts.expert_weights().values()], dim=1)
    groups = [[e] for e in range(E)]
    mass = [float(usage_E[e]) + 1e-12 for e in range(E)]
    centres = [flat_EP[e] for e in range(E)]
    while len(groups) > target:
        stacked = torch.nn.functional.normalize(torch.stack(centres), dim=1)
        similarity = stacked @ stacked.t()
        similarity.fill_diagonal_(-2.0)
        a, b = divmod(int(similarity.argmax()), len(groups))
        a, b = min(a, b), max(a, b)
        centres[a] = (mass[a] * centres[a] + mass[b] * centres[b]) / (mass[a] + mass[b])
        mass[a] += mass[b]
        groups[a] += groups[b]
        del groups[b], centres[b], mass[b]
    return [sorted(g) for g in groups]


def merged_layer_state(layer: MoELayer, groups: Sequence[Sequence[int]], weights_E: Tensor) -> dict[str, Tensor]:
    """The layer's state dict with its experts (and router rows) merged group by group."""
    E = layer.num_experts
    if hasattr(layer.router, "slot_embeddings_DS"):
        raise ConfigError("Soft MoE's slots mix every expert's inputs: merging its experts is not supported")
    if getattr(layer.experts, "granularity", 1) != 1:
        raise ConfigError("merging fine-grained experts (expert.granularity > 1) is not supported: merge coarse experts")
    state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    group_of = torch.empty(E, dtype=torch.long)
    for g, members in enumerate(groups):
        group_of[list(members)] = g
    coefficients = []
    for members in groups:
        w = weights_E[list(members)].double()
        coefficients.append(w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(members)))

    def merge(stack: Tensor) -> Tensor:
        return torch.stack([(c.to(stack.dtype).view(-1, *[1] * (stack.dim() - 1)) * stack[list(m)]).sum(0)
                            for m, c in zip(groups, coefficients)])

    out = {}
    for key, value in state.items():
        if key.startswith("experts.") or key.startswith("router."):
            if value.dim() >= 1 and value.shape[0] == E and value.is_floating_point():
                out[key] = merge(value)  # expert stacks, router rows (gate, noise), per-expert biases
            elif key.endswith("expert_of_key"):
                out[key] = group_of[value.long()].to(value.dtype)  # hash: each key's expert → its group
            elif key.startswith("router.") and value.dim() >= 1 and E in value.shape:
                raise ConfigError(f"cannot merge {type(layer.router).__name__}'s {key} {tuple(value.shape)}: pick a "
                                  "token-choice router checkpoint (top-k, switch, hash, ...)")
            else:
                out[key] = value
        else:
            out[key] = value
    return out
