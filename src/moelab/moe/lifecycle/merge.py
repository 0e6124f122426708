"""Merging a trained MoE layer's experts into fewer.

Two kinds, named for what they do:

- Averages (`neighbour-usage`, `neighbour-mean`, `weight-similarity`): groups of experts
  become one expert each, every weight (W1, W3, W2, biases) and every router row the
  average of its members, weighted by each member's share of the tokens
  (`neighbour-usage`, `weight-similarity`) or equally (`neighbour-mean`). The neighbour
  methods group experts 0..E/E'−1, …; `weight-similarity` agglomerates the most similar
  experts first (cosine similarity of their flattened weights, usage-weighted means as
  groups grow). The router changes: its rows are averaged too, so routing changes.
- MC-SMoE (`mc-smoe`; Li et al. 2023, "Merge, Then Compress"): the E' most used experts on
  the calibration data are dominant; every other expert joins the dominant expert whose
  router-logit column (its logits over the calibration tokens) is most similar (cosine);
  each group's weights are averaged, weighted by usage, and **the router is kept**: every
  member is bound to its group's merged weights, so a token routed to a member runs the
  merged expert. Here the binding keeps the E expert slots, each holding its group's weights
  (the model computes what the compressed one does; its checkpoint is not smaller). The
  paper's neuron alignment before averaging is not done.

Each is a one-shot approximation, evaluated by the caller (scripts/merge_experts.py).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from moelab.moe.errors import ConfigError
from moelab.moe.layer import MoELayer

AVERAGES = ("neighbour-usage", "neighbour-mean", "weight-similarity")
METHODS = (*AVERAGES, "mc-smoe")


def expert_groups(layer: MoELayer, target: int, method: str, usage_E: Tensor,
                  logits_TE: Tensor | None = None) -> list[list[int]]:
    """Which experts become each of the `target` merged experts. `mc-smoe` needs the router
    logits of calibration tokens (`logits_TE`)."""
    E = layer.num_experts
    if method not in METHODS:
        raise ConfigError(f"--method {method} is unknown: pick one of {', '.join(METHODS)}")
    if not 1 <= target <= E:
        raise ConfigError(f"--to {target} must be between 1 and the {E} experts the model has")
    if method == "mc-smoe":
        if logits_TE is None:
            raise ConfigError("--method mc-smoe groups experts by their router logits: the calibration pass gave none")
        return mc_smoe_groups(usage_E, logits_TE, target)
    if method in ("neighbour-usage", "neighbour-mean"):
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


def mc_smoe_groups(usage_E: Tensor, logits_TE: Tensor, target: int) -> list[list[int]]:
    """MC-SMoE's grouping: the `target` most used experts lead a group each (ties: the lower
    index); every other expert joins the leader whose router-logit column is the most
    similar by cosine. Groups are listed in the leaders' order of usage."""
    E = usage_E.numel()
    order = sorted(range(E), key=lambda e: (-float(usage_E[e]), e))
    dominant = order[:target]
    columns_ET = torch.nn.functional.normalize(logits_TE.t().double(), dim=1)
    similarity_ED = columns_ET @ columns_ET[dominant].t()
    groups = {d: [d] for d in dominant}
    for e in range(E):
        if e not in groups:
            groups[dominant[int(similarity_ED[e].argmax())]].append(e)
    return [sorted(groups[d]) for d in dominant]


def _coefficients(groups: Sequence[Sequence[int]], weights_E: Tensor) -> list[Tensor]:
    out = []
    for members in groups:
        w = weights_E[list(members)].double()
        out.append(w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(members)))
    return out


def merged_layer_state(layer: MoELayer, groups: Sequence[Sequence[int]], weights_E: Tensor,
                       bind: bool = False) -> dict[str, Tensor]:
    """The layer's state dict with its experts merged group by group. Averages (`bind=False`):
    E' experts, the router's per-expert rows (its `expert_rows`) merged the same way, a hash
    map and a token mask mapped onto the groups. MC-SMoE (`bind=True`): the router as it was,
    and every member of a group holding its group's merged weights (E slots)."""
    E = layer.num_experts
    if hasattr(layer.router, "slot_embeddings_DS"):
        raise ConfigError("Soft MoE's slots mix every expert's inputs: merging its experts is not supported")
    if getattr(layer.experts, "granularity", 1) != 1:
        raise ConfigError("merging fine-grained experts (expert.granularity > 1) is not supported: merge coarse experts")
    state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    group_of = torch.empty(E, dtype=torch.long)
    for g, members in enumerate(groups):
        group_of[list(members)] = g
    coefficients = _coefficients(groups, weights_E)

    def merge(stack: Tensor) -> Tensor:
        merged = torch.stack([(c.to(stack.dtype).view(-1, *[1] * (stack.dim() - 1)) * stack[list(m)]).sum(0)
                              for m, c in zip(groups, coefficients)])
        return merged[group_of] if bind else merged

    if not hasattr(layer.router, "expert_rows"):
        raise ConfigError(f"{type(layer.router).__name__} does not say which of its weights are per expert: "
                          "merging its experts is not supported")
    rows = set(layer.router.expert_rows)
    out = {}
    for key, value in state.items():
        if key.startswith("experts.") and value.dim() >= 1 and value.shape[0] == E and value.is_floating_point():
            out[key] = merge(value)  # expert stacks and per-expert biases
        elif key.startswith("router.") and not bind:
            name = key[len("router."):]
            if name in rows:
                out[key] = merge(value)  # the router's rows: one per expert
            elif name == "expert_of_key":
                out[key] = group_of[value.long()].to(value.dtype)  # hash: each key's expert → its group
            elif name == "allowed_VE":  # MaskMoE: an id may use a group if it could use any member
                out[key] = torch.stack([value[:, list(m)].any(1) for m in groups], dim=1)
            else:  # not per expert (a projection, a temperature): kept
                out[key] = value
        else:
            out[key] = value
    return out
