"""MoELayer: router + grouped experts + auxiliary losses, as one drop-in feed-forward block."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from moelab.moe.errors import ConfigError
from moelab.moe.losses import AUX_LOSSES
from moelab.moe.routing import Routing, RoutingContext


class MoELayer(nn.Module):
    """A mixture-of-experts feed-forward layer on (..., D) inputs.

    `router` and `experts` are factories (e.g. `functools.partial` or Hydra `_partial_`
    configs) so every layer builds its own: `router(d_model=D)`, `experts(d_model=D,
    hidden=F)`. `aux_loss_weights` maps loss names of `moelab.moe.losses.AUX_LOSSES` to
    weights. After each forward the layer keeps, as side channels for the training task
    and callbacks, `aux_losses` (unweighted values by name), `aux_loss` (their weighted
    sum) and `last_plan` (the Routing plan).
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        router: Callable[..., nn.Module],
        experts: Callable[..., nn.Module],
        aux_loss_weights: Mapping[str, float] | None = None,
        layer_index: int | None = None,
    ) -> None:
        super().__init__()
        self.router = router(d_model=d_model)
        self.experts = experts(d_model=d_model, hidden=hidden)
        if self.router.num_experts != self.experts.num_experts:
            raise ConfigError(
                f"router has {self.router.num_experts} experts but the experts module "
                f"{self.experts.num_experts}: set both from the top-level `experts`"
            )
        weights = dict(aux_loss_weights or {})
        unknown = sorted(set(weights) - set(AUX_LOSSES))
        if unknown:
            raise ConfigError(f"unknown auxiliary loss {unknown}: pick from {', '.join(AUX_LOSSES)}")
        self.aux_loss_weights = {name: float(w) for name, w in weights.items()}
        self.layer_index = layer_index
        self.aux_losses: dict[str, Tensor] = {}
        self.aux_loss: Tensor | None = None
        self.last_plan: Routing | None = None

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def causal_safe(self) -> bool:
        """Whether each token's output depends on that token alone (safe in a causal LM)."""
        return bool(getattr(self.router, "causal_safe", False))

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """x: (B, L, D) or (T, D); token_ids: (B, L) ids for routers that hash them."""
        x_TD = x.reshape(-1, x.shape[-1])
        plan = self.router(x_TD, RoutingContext.for_input(x, token_ids))
        x_ND, group_sizes_E = plan.dispatch(x_TD)
        y_ND = self.experts(x_ND, group_sizes_E)
        y_TD = plan.combine(y_ND)
        self.aux_losses = {name: AUX_LOSSES[name](plan) for name in self.aux_loss_weights}
        self.aux_loss = sum(
            (w * self.aux_losses[name] for name, w in self.aux_loss_weights.items()),
            torch.zeros((), device=x.device),
        )
        self.last_plan = plan
        return y_TD.reshape(x.shape).to(x.dtype)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def collect_aux_losses(model: nn.Module) -> tuple[Tensor | None, dict[str, Tensor]]:
    """The one place auxiliary losses are summed: (total weighted loss over all layers,
    unweighted value of each named loss averaged over layers)."""
    layers = [m for m in moe_layers(model) if m.aux_loss is not None]
    if not layers:
        return None, {}
    total = sum(m.aux_loss for m in layers)
    per_name = {
        name: torch.stack([m.aux_losses[name] for m in layers]).mean()
        for name in layers[0].aux_losses
    }
    return total, per_name
