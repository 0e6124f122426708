"""The MoE layer and its swappable parts. Plain PyTorch: no Lightning, no Hydra."""

from moelab.moe.errors import ConfigError
from moelab.moe.experts import GroupedExperts, LoRAExperts
from moelab.moe.layer import MoELayer
from moelab.moe.losses import AUX_LOSSES, balance_loss, z_loss
from moelab.moe.routed import active_parameters, after_optimizer_step, collect_aux_losses, moe_layers, routed_layers
from moelab.moe.routers import (
    AuxFreeRouter,
    CosineRouter,
    DenseRouter,
    ExpertChoiceRouter,
    GShardRouter,
    HashRouter,
    NoisyTopKRouter,
    SinkhornRouter,
    SmearRouter,
    SoftMoERouter,
    TopKRouter,
)
from moelab.moe.routing import MergedRouting, Routing, RoutingContext, SoftRouting

__all__ = [
    "AUX_LOSSES",
    "AuxFreeRouter",
    "ConfigError",
    "CosineRouter",
    "DenseRouter",
    "ExpertChoiceRouter",
    "GShardRouter",
    "GroupedExperts",
    "LoRAExperts",
    "HashRouter",
    "MoELayer",
    "NoisyTopKRouter",
    "Routing",
    "RoutingContext",
    "SinkhornRouter",
    "SmearRouter",
    "MergedRouting",
    "SoftMoERouter",
    "SoftRouting",
    "TopKRouter",
    "active_parameters",
    "after_optimizer_step",
    "balance_loss",
    "collect_aux_losses",
    "moe_layers",
    "routed_layers",
    "z_loss",
]
