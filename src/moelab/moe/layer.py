"""MoELayer: router + grouped experts + auxiliary losses, as one drop-in feed-forward block."""

from __future__ import annotations

import warnings
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from moelab.moe.errors import ConfigError
from moelab.moe.factories import accepted_keywords, factory_k, factory_keyword
from moelab.moe.losses import aux_losses_of, check_aux_loss_weights, usable_loss_weights
from moelab.moe.routing import MergedRouting, Routing, RoutingContext


class MoELayer(nn.Module):
    """A mixture-of-experts feed-forward layer on (..., D) inputs.

    `router` and `experts` are factories (e.g. `functools.partial` or Hydra `_partial_`
    configs) so every layer builds its own: `experts(d_model=D, hidden=F)` and
    `router(d_model=D, num_experts=<the experts module's count>, ...)`. A router factory
    also gets those of `layer_index` and `router_facts` (facts about the model, such as
    `vocab_size` or `num_positions`) that its signature names.

    Width: with `match_dense_flops=False`, `hidden` is each expert's width F. With
    `match_dense_flops=True`, `hidden` is the width H of the dense FFN this layer replaces,
    and F is chosen so one token's active expert FLOPs equal the dense FFN's: F = H·m·c / (r + s),
    r the fine experts a token is routed to, s the shared ones (top-k: F = H / k), and c the
    dense FFN's matrices over an expert's (`dense_activation`: a GELU MLP has two, SwiGLU
    and GeGLU experts three, so c = 2/3 beside a GELU dense FFN; 1 when they match). F/m is
    rounded to a multiple of 8 (the grouped matmul's alignment), with a warning when that
    moves the active FLOPs off the dense FFN's.

    Fine-grained and shared experts (DeepSeekMoE, Dai et al. 2024, sec. 3): with
    granularity m and s shared experts a top-k router routes each token to k·m − s of the
    E·m fine experts, so that k·m fine experts are active in all, as many units as k
    coarse experts. `aux_loss_weights` maps loss names of `moelab.moe.losses.AUX_LOSSES` to
    weights; a weighted loss the router does not support (e.g. balance for Soft MoE, which
    is balanced by construction) is skipped with a warning.

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
        match_dense_flops: bool = False,
        router_facts: Mapping[str, object] | None = None,
        dense_activation: str | None = None,
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        if match_dense_flops:
            # Only its shape (expert count, granularity, shared experts), at the smallest
            # width every granularity accepts: the real experts follow the router.
            probe_hidden = 8 * (factory_keyword(experts, "granularity") or 1)
            with torch.device("meta"):
                shape = experts(d_model=d_model, hidden=probe_hidden)
        else:
            shape = self.experts = experts(d_model=d_model, hidden=hidden)
        granularity = getattr(shape, "granularity", 1)
        self.num_shared = getattr(shape, "num_shared", 0)
        facts = {"layer_index": layer_index, **(router_facts or {})}
        fine_k = self._router_k(router, granularity)
        try:
            self.router = router(d_model=d_model, num_experts=shape.num_experts, **fine_k, **accepted_keywords(router, facts))
        except ConfigError as error:
            if not fine_k:
                raise
            raise ConfigError(
                f"{error}; note that this router's k is router.k × expert.granularity − expert.num_shared = "
                f"{factory_k(router)} × {granularity} − {self.num_shared} = {fine_k['k']} (DeepSeekMoE): "
                "raise router.k or expert.granularity, or lower expert.num_shared"
            ) from error
        self.dense_hidden = hidden if match_dense_flops else None
        if match_dense_flops:
            self.experts = experts(d_model=d_model, hidden=self._matched_width(hidden, granularity, shape, dense_activation))
        if getattr(self.router, "kind", None) == "smear" and not hasattr(self.experts, "merged_forward"):
            raise ConfigError(f"router=smear merges the experts' weights, which {type(self.experts).__name__} cannot: "
                              "use expert=mlp, swiglu or geglu")
        make_shared = getattr(self.experts, "make_shared_experts", None)
        self.shared_experts = make_shared() if make_shared else None
        self._check_losses(check_aux_loss_weights(aux_loss_weights or {}))
        # Set by moelab.parallel to move grouped tokens to the ranks owning their experts.
        self.expert_exchange: Callable[[Tensor, Tensor, nn.Module], Tensor] | None = None
        self.aux_losses: dict[str, Tensor] = {}
        self.aux_loss: Tensor | None = None
        self.last_plan: Routing | None = None
        self.reset_parameters()

    def _router_k(self, router: Callable[..., nn.Module], granularity: int) -> dict[str, int]:
        """The fine-grained top-k: k·m − s routed experts for a factory's k (DeepSeekMoE)."""
        if granularity == 1 and not self.num_shared:
            return {}
        if getattr(getattr(router, "func", router), "fixed_k", False):
            raise ConfigError(
                f"expert.granularity={granularity} and expert.num_shared={self.num_shared} change how many experts "
                "a token is routed to (k·m − shared), and this router's k is fixed (gshard is top-2 by definition): "
                "use router=topk with router.k, or plain experts"
            )
        bound_k = factory_k(router)
        if bound_k is None:
            if granularity > 1:
                raise ConfigError(
                    f"expert.granularity={granularity} multiplies the router's k, and this router sets none: "
                    "use a top-k router (topk, noisy_topk, cosine, aux_free, sinkhorn) with router.k, or granularity=1"
                )
            return {}  # shared experts beside a router without k: added on top
        routed = bound_k * granularity - self.num_shared
        if routed < 1:
            raise ConfigError(
                f"router.k={bound_k} × expert.granularity={granularity} gives {bound_k * granularity} active experts "
                f"per token, and expert.num_shared={self.num_shared} of them are shared, leaving none routed: "
                "raise router.k or expert.granularity, or lower expert.num_shared"
            )
        return {"k": routed}

    def _matched_width(self, dense_hidden: int, granularity: int, shape: nn.Module, dense_activation: str | None) -> int:
        """Coarse expert width F with (r + s)·F/m·(matrices of an expert) = H·(matrices of the
        dense FFN), F/m a multiple of 8."""
        active = float(getattr(self.router, "experts_per_token", 1)) + self.num_shared
        expert_activation = getattr(shape, "activation", None)
        ratio = 1.0
        if dense_activation is not None and expert_activation is not None:
            ratio = _matrices(dense_activation) / _matrices(expert_activation)
        units = dense_hidden * ratio  # the dense FFN's FLOPs in expert units
        fine = max(8, round(units / active / 8) * 8)
        if abs(fine * active - units) > 1e-6 * units:
            warnings.warn(
                f"MoE layer{'' if self.layer_index is None else f' {self.layer_index}'}: experts of {fine * granularity} "
                f"units ({fine} per fine expert) give {fine * active / units:.3f} of the dense FFN's FLOPs per token: "
                "pick a dense width divisible by 8·(active experts per token) for equal FLOPs",
                stacklevel=3,
            )
        return fine * granularity

    def _check_losses(self, weights: dict[str, float]) -> None:
        self.aux_loss_weights = usable_loss_weights(self.router, weights)

    @torch.no_grad()
    def reset_parameters(self, in_std: float | None = None, out_std: float | None = None,
                         dense_hidden: int | None = None) -> None:
        """Initialise the experts so the layer starts like the dense FFN it replaces.

        The dense twin has width H = `dense_hidden` (default: the layer's own H, or its
        active width (r + s)·f), input weights ~ N(0, in_std²) (default d^-1/2) and output
        weights ~ N(0, out_std²) (default H^-1/2). Every expert's input weights are drawn
        like the twin's, so hidden activations a match; the output weights of routed and
        shared experts (width f each) get σ = out_std · sqrt(H / (f · (1/r + s))).

        Why: the twin's output has RMS² = out_std² · H · E[a²]. The layer's output, with a
        token's combine weights g summing to 1 evenly over its r routed experts (Σ g² = 1/r)
        plus s shared experts of weight 1, has RMS² = σ² · f · (1/r + s) · E[a²]. Routers
        whose weights do not sum to 1 (unnormalised top-1 as in Switch, expert choice)
        scale the output by their gate, as in their papers.
        """
        init = getattr(self.experts, "reset_parameters", None)
        fine = getattr(self.experts, "hidden", None)
        if init is None or fine is None:
            return  # experts of another kind initialise themselves
        routed = float(getattr(self.router, "experts_per_token", 1))
        if getattr(self.experts, "shared_base", False):
            routed = 1.0  # experts that start as one FFN mix to that FFN: Σ g² does not shrink it
        twin = dense_hidden or self.dense_hidden or round((routed + self.num_shared) * fine)
        in_std = self.experts.d_model**-0.5 if in_std is None else in_std
        out_std = twin**-0.5 if out_std is None else out_std
        expert_out_std = out_std * (twin / (fine * (1 / routed + self.num_shared))) ** 0.5
        # SMEAR merges weights, Σ p_i W_i: at even p their std is σ/sqrt(E), so draw them wider.
        gain = float(getattr(self.router, "merged_init_gain", 1.0))
        init(in_std * gain, expert_out_std * gain)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters(in_std, expert_out_std)

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
        # Under autocast the experts compute in its dtype: cast the T tokens once, before
        # they are copied k times (the router above still sees them in full precision).
        if torch.is_autocast_enabled(x.device.type):
            x_TD = x_TD.to(torch.get_autocast_dtype(x.device.type))
        if isinstance(plan, MergedRouting):  # SMEAR: one FFN of merged parameters, nothing dispatched
            y_TD = self.experts(x_TD, None, merge_GE=plan.merge_GE, per_token=plan.per_token)
        elif getattr(self.experts, "gathers_tokens", False) and self.expert_exchange is None and isinstance(plan, Routing):
            # The experts gather each row's token themselves (a fused kernel): no dispatched copy.
            y_TD = plan.combine(self.experts(x_TD, plan.group_sizes_E, token_index_N=plan.token_index_N))
        else:
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
            self.aux_losses, self.aux_loss = aux_losses_of(plan, self.aux_loss_weights, x.device)
        return y_TD.reshape(x.shape).to(x.dtype)


def _matrices(activation: str) -> int:
    """Weight matrices of an FFN: two for GELU (in, out), three for the gated SwiGLU and GeGLU."""
    return 2 if activation == "gelu" else 3
