"""MoELayer: router + grouped experts + auxiliary losses, as one drop-in feed-forward block."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from moelab.moe.errors import ConfigError
from moelab.moe.losses import AUX_LOSSES, SIGNED_LOSSES
from moelab.moe.routing import Routing, RoutingContext


class MoELayer(nn.Module):
    """A mixture-of-experts feed-forward layer on (..., D) inputs.

    `router` and `experts` are factories (e.g. `functools.partial` or Hydra `_partial_`
    configs) so every layer builds its own: `experts(d_model=D, hidden=F)` first, then
    `router(d_model=D, num_experts=<the experts module's count>)`; with fine-grained
    experts (granularity m) a router's `k` set in its factory is multiplied by m.
    `aux_loss_weights` maps loss names of `moelab.moe.losses.AUX_LOSSES` to weights; a
    weighted loss the router does not support (e.g. balance for Soft MoE, which is
    balanced by construction) is skipped with a warning.

    After each training forward the layer keeps, as side channels for the task and the
    callbacks, `aux_losses` (unweighted values by name), `aux_loss` (their weighted sum)
    and, after every forward, `last_plan` (the routing plan).
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
        self.experts = experts(d_model=d_model, hidden=hidden)
        make_shared = getattr(self.experts, "make_shared_experts", None)
        self.shared_experts = make_shared() if make_shared else None
        router_overrides = {"num_experts": self.experts.num_experts}
        granularity = getattr(self.experts, "granularity", 1)
        if granularity > 1:
            factory_k = getattr(router, "keywords", {}).get("k")
            if factory_k is None:
                raise ConfigError(
                    f"expert.granularity={granularity} multiplies the router's k, and this router sets none: "
                    "use a top-k router (topk, noisy_topk, cosine, aux_free, sinkhorn) with router.k, or granularity=1"
                )
            router_overrides["k"] = factory_k * granularity
        self.router = router(d_model=d_model, **router_overrides)
        weights = check_aux_loss_weights(aux_loss_weights or {})
        supported = getattr(self.router, "supported_losses", frozenset(AUX_LOSSES))
        skipped = sorted(name for name, w in weights.items() if w and name not in supported)
        if skipped:
            warnings.warn(
                f"router {type(self.router).__name__} ignores auxiliary loss {skipped} "
                f"(it supports {sorted(supported) or 'none'})",
                stacklevel=2,
            )
        if weights.get("balance") and type(self.router).__name__ == "AuxFreeRouter":
            warnings.warn(
                "router=aux_free balances with its bias; a non-zero balance loss weight fights it: use loss=none or zloss",
                stacklevel=2,
            )
        self.aux_loss_weights = {name: w for name, w in weights.items() if name in supported}
        self.layer_index = layer_index
        # Set by moelab.parallel to move grouped tokens to the ranks owning their experts.
        self.expert_exchange: Callable[[Tensor, Tensor, nn.Module], Tensor] | None = None
        self.aux_losses: dict[str, Tensor] = {}
        self.aux_loss: Tensor | None = None
        self.last_plan: Routing | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def causal_safe(self) -> bool:
        """Whether each token's output depends on that token alone (safe in a causal LM)."""
        return bool(getattr(self.router, "causal_safe", False))

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """x: (B, L, D) or (T, D); token_ids: (B, L) ids for routers that hash them."""
        x_TD = x.reshape(-1, x.shape[-1])
        plan = self.router(x_TD, RoutingContext.for_input(x, token_ids))
        x_ND, group_sizes_E = plan.dispatch(x_TD)
        if self.expert_exchange is None:
            y_ND = self.experts(x_ND, group_sizes_E)
        else:
            y_ND = self.expert_exchange(x_ND, group_sizes_E, self.experts)
        y_TD = plan.combine(y_ND)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        self.last_plan = plan
        if self.training:
            self.aux_losses = {name: AUX_LOSSES[name](plan) for name in self.aux_loss_weights}
            self.aux_loss = sum(
                (w * self.aux_losses[name] for name, w in self.aux_loss_weights.items()),
                torch.zeros((), device=x.device),
            )
        return y_TD.reshape(x.shape).to(x.dtype)


def check_aux_loss_weights(aux_loss_weights: Mapping[str, object]) -> dict[str, float]:
    """Loss name → weight as floats; one-line errors for unknown names, non-numbers and
    negative weights (which would reward what the loss penalises: a negative balance weight
    trains towards imbalance). Losses in SIGNED_LOSSES take either sign on purpose."""
    unknown = sorted(set(aux_loss_weights) - set(AUX_LOSSES))
    if unknown:
        raise ConfigError(f"unknown auxiliary loss {unknown}: pick from {', '.join(AUX_LOSSES)}")
    weights = {}
    for name, weight in aux_loss_weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"loss.{name}={weight} must be a number")
        if weight < 0 and name not in SIGNED_LOSSES:
            raise ConfigError(
                f"loss.{name}={weight} is negative, which rewards what the {name} loss penalises: "
                f"use a weight >= 0 (0 turns it off)"
            )
        weights[name] = float(weight)
    return weights


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def active_parameters(model: nn.Module) -> int:
    """Parameters one token uses: all of them, except that each MoE layer counts only the
    share experts_per_token / E of its routed experts (Soft MoE, whose share depends on the
    sequence length, counts as 1 expert per token)."""
    total = sum(param.numel() for param in model.parameters())
    for layer in moe_layers(model):
        routed = sum(param.numel() for param in layer.experts.parameters())
        share = getattr(layer.router, "experts_per_token", 1) / layer.num_experts
        total -= round(routed * (1 - min(share, 1.0)))
    return total


def collect_aux_losses(model: nn.Module) -> tuple[Tensor | None, dict[str, Tensor]]:
    """The one place auxiliary losses are summed: (total weighted loss over all layers,
    unweighted value of each named loss averaged over layers)."""
    layers = [m for m in moe_layers(model) if m.aux_loss is not None]
    if not layers:
        return None, {}
    total = sum(m.aux_loss for m in layers)
    names = {name for m in layers for name in m.aux_losses}
    per_name = {
        name: torch.stack([m.aux_losses[name] for m in layers if name in m.aux_losses]).mean()
        for name in sorted(names)
    }
    return total, per_name


def after_optimizer_step(model: nn.Module) -> None:
    """Router state that moves once per optimizer step (aux-loss-free biases). Training
    loops call this right after `optimizer.step()`."""
    for layer in moe_layers(model):
        update = getattr(layer.router, "update_bias", None)
        if update is not None:
            update()
