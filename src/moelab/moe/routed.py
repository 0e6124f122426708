"""The routed layers of a model (MoE feed-forward layers and mixtures of attention heads) and
what a training loop asks of them: the auxiliary losses summed once, the router updates
after an optimizer step, and the parameters one token uses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.moe.attention import MixtureOfAttention
from moelab.moe.layer import MoELayer


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE feed-forward layers in module order (what expert parallelism splits)."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def routed_layers(model: nn.Module) -> list[nn.Module]:
    """Every module that routes tokens to experts, in module order: the MoE feed-forward
    layers and mixtures of attention heads (moelab.moe.attention). Each has `router`,
    `experts`, `num_experts`, `layer_index`, `last_plan`, `aux_losses` and `aux_loss`."""
    return [m for m in model.modules() if isinstance(m, (MoELayer, MixtureOfAttention))]


def active_parameters(model: nn.Module) -> int:
    """Parameters one token uses: all of them, except that each routed layer (MoE FFN or
    mixture of attention heads) counts only the share experts_per_token / E of its experts
    (Soft MoE at its default of a slot per token counts as 1 expert per token; per-token SMEAR,
    which runs every expert for every token, as all of them)."""
    total = sum(param.numel() for param in model.parameters())
    for layer in routed_layers(model):
        routed = sum(param.numel() for param in layer.experts.parameters())
        per_token = getattr(layer.router, "expert_passes_per_token", getattr(layer.router, "experts_per_token", 1))
        share = per_token / layer.num_experts
        total -= round(routed * (1 - min(share, 1.0)))
    return total


def collect_aux_losses(model: nn.Module, per_name: bool = True) -> tuple[Tensor | None, dict[str, Tensor]]:
    """The one place auxiliary losses are summed: (total weighted loss over all layers,
    unweighted value of each named loss averaged over layers; `per_name=False` skips the
    averages, which only logging reads, and returns {})."""
    layers = [m for m in routed_layers(model) if m.aux_loss is not None]
    if not layers:
        return None, {}
    total = sum(m.aux_loss for m in layers)
    if not per_name:
        return total, {}
    names = {name for m in layers for name in m.aux_losses}
    per_name_values = {
        name: torch.stack([m.aux_losses[name] for m in layers if name in m.aux_losses]).mean()
        for name in sorted(names)
    }
    return total, per_name_values


def after_optimizer_step(model: nn.Module) -> None:
    """Router state that moves once per optimizer step (aux-loss-free biases). Training
    loops call this right after `optimizer.step()`."""
    for layer in routed_layers(model):
        update = getattr(layer.router, "update_bias", None)
        if update is not None:
            update()
