"""The MoE layer and its swappable parts. Plain PyTorch: no Lightning, no Hydra."""

from moelab.moe.errors import ConfigError
from moelab.moe.experts import GroupedExperts
from moelab.moe.layer import MoELayer, collect_aux_losses, moe_layers
from moelab.moe.losses import AUX_LOSSES, balance_loss, z_loss
from moelab.moe.routers import TopKRouter
from moelab.moe.routing import Routing, RoutingContext

__all__ = [
    "AUX_LOSSES",
    "ConfigError",
    "GroupedExperts",
    "MoELayer",
    "Routing",
    "RoutingContext",
    "TopKRouter",
    "balance_loss",
    "collect_aux_losses",
    "moe_layers",
    "z_loss",
]
