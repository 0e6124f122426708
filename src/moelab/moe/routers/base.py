"""What every router shares: fp32 router logits, the gate's initialisation, the losses a
token-choice router supports, checks of its settings, and the seeded balanced maps from keys
(token ids, positions) to experts that hash routing and MaskMoE draw."""

from __future__ import annotations

import heapq

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.moe.errors import ConfigError

TOKEN_CHOICE_LOSSES = frozenset({"balance", "zloss", "importance", "seq_balance", "entropy"})


def router_logits(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    """h = x W_gᵀ in fp32, outside autocast."""
    with torch.autocast(x_TD.device.type, enabled=False):
        return F.linear(x_TD.float(), weight_ED.float())


def linear_gate(d_model: int, num_experts: int) -> nn.Linear:
    """W_g without bias, drawn from a truncated normal with σ = sqrt(0.1 / d): the Switch
    Transformer's reduced initialisation scale (Fedus et al. 2021, sec. 2.3). On unit-RMS
    inputs the logits start with std ≈ 0.3, so a token's routing weights start close to even
    over its chosen experts, and an MoE layer's output starts at the dense FFN's scale (see
    MoELayer.reset_parameters)."""
    gate = nn.Linear(d_model, num_experts, bias=False)
    std = (0.1 / d_model) ** 0.5
    nn.init.trunc_normal_(gate.weight, std=std, a=-2 * std, b=2 * std)
    return gate


def check_factor(name: str, factor: float | None) -> None:
    if factor is not None and factor <= 0:
        raise ConfigError(f"router.{name}={factor} must be > 0, or null for dropless routing")


def balanced_key_map(num_keys: int, num_experts: int, seed: int) -> Tensor:
    """A random map from `num_keys` keys to experts in which every expert gets ⌊K/E⌋ or
    ⌈K/E⌉ keys (a seeded permutation of the keys dealt to experts in turn)."""
    order_K = torch.randperm(num_keys, generator=torch.Generator().manual_seed(seed))
    expert_of_key = torch.empty(num_keys, dtype=torch.long)
    expert_of_key[order_K] = torch.arange(num_keys) % num_experts
    return expert_of_key


def frequency_balanced_key_map(frequency_K: Tensor, num_experts: int, seed: int) -> Tensor:
    """Hash layers' balanced assignment (Roller et al. 2021, "balanced assignment"): keys in
    decreasing frequency, each given to the expert with the least frequency mass so far
    (ties: fewer keys, then a seeded order of the experts), so every expert's expected load
    is within the largest single key's frequency of every other's. Keys the data never
    show carry no mass: they are dealt to the experts with the fewest keys, so unseen ids
    spread out instead of all joining the lightest expert. Keys of equal frequency are taken
    in a seeded random order, so each seed gives its own map."""
    generator = torch.Generator().manual_seed(seed)
    shuffled_K = torch.randperm(frequency_K.numel(), generator=generator)
    order = shuffled_K[torch.argsort(frequency_K[shuffled_K].double(), descending=True, stable=True)]
    tie_rank = torch.randperm(num_experts, generator=generator).tolist()
    by_load = [(0.0, 0, tie_rank[e], e) for e in range(num_experts)]
    expert_of_key = torch.empty(frequency_K.numel(), dtype=torch.long)
    masses = frequency_K.double()[order].tolist()
    seen = sum(mass > 0 for mass in masses)
    for key, mass in zip(order[:seen].tolist(), masses[:seen]):
        load, count, rank, expert = heapq.heappop(by_load)
        expert_of_key[key] = expert
        heapq.heappush(by_load, (load + mass, count + 1, rank, expert))
    by_count = [(count, rank, expert) for _, count, rank, expert in by_load]
    heapq.heapify(by_count)
    for key in order[seen:].tolist():
        count, rank, expert = heapq.heappop(by_count)
        expert_of_key[key] = expert
        heapq.heappush(by_count, (count + 1, rank, expert))
    return expert_of_key


def layer_seed(seed: int, layer_index: int | None) -> int:
    """One seed per (run seed, layer) pair, distinct across both (seed + layer would give
    run seed 2's layer 1 the map of run seed 0's layer 3)."""
    return seed * 1_000_003 + (layer_index or 0)
