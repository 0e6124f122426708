"""Token-choice routers: each token picks k experts. The shared machinery (k, weight
renormalisation, capacity, batch priority, token-id masks) and the rules that differ only
in their scores: top-k (Switch is k=1), GShard top-2, noisy top-k and the cosine router.
Router math runs in fp32 whatever the compute dtype (ST-MoE, Zoph et al. 2022, sec. 3.3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.moe.dispatch import expert_capacity, token_choice_routing
from moelab.moe.errors import ConfigError, check_num_experts
from moelab.moe.routers.base import (
    TOKEN_CHOICE_LOSSES,
    check_factor,
    frequency_balanced_key_map,
    layer_seed,
    linear_gate,
    router_logits,
)
from moelab.moe.routing import Routing, RoutingContext


class TokenChoiceRouter(nn.Module):
    """Shared machinery of routers where each token picks k experts: k, weight
    renormalisation, capacity (train and eval factors) and batch priority routing.

    Subclasses compute scores and call `plan(...)`.
    """

    kind = "token_choice"
    supported_losses = TOKEN_CHOICE_LOSSES
    # State entries with one row per expert (what merging experts must merge); every other
    # entry is kept as it is.
    expert_rows: tuple[str, ...] = ("gate.weight",)
    normalize_configurable = True  # False for routers whose weights are always renormalised

    def __init__(
        self,
        num_experts: int,
        k: int,
        normalize: bool,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        batch_priority: bool = False,
        token_mask: str | None = None,
        rare_share: float = 0.5,
        vocab_size: int | None = None,
        layer_index: int | None = None,
        frequent_experts: int | None = None,
    ) -> None:
        super().__init__()
        check_num_experts(num_experts)
        if not 1 <= k <= num_experts:
            raise ConfigError(
                f"router.k={k} must be between 1 and experts={num_experts}: lower router.k or raise experts"
            )
        if k == 1 and normalize:
            fix = "set router.normalize=false" if self.normalize_configurable else "this router renormalises, use router.k>=2"
            raise ConfigError(
                f"router.k=1 with renormalised weights makes every weight 1, so the router gets no gradient from the task: {fix}"
            )
        check_factor("capacity_factor", capacity_factor)
        check_factor("eval_capacity_factor", eval_capacity_factor)
        if batch_priority and capacity_factor is None and eval_capacity_factor is None:
            raise ConfigError("router.batch_priority=true only orders capacity drops: set router.capacity_factor")
        self.num_experts = num_experts
        self.k = k
        self.normalize = normalize
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = capacity_factor if eval_capacity_factor is None else eval_capacity_factor
        self.batch_priority = batch_priority
        if token_mask not in (None, "frequency"):
            raise ConfigError(f"router.token_mask={token_mask!r} is unknown: pick null or frequency")
        self.token_mask, self.rare_share, self.frequent_experts = token_mask, rare_share, frequent_experts
        if frequent_experts is not None and (token_mask is None or not 1 <= frequent_experts <= num_experts):
            raise ConfigError(f"router.frequent_experts={frequent_experts} is the experts each frequent id may use under "
                              f"router.token_mask=frequency: between 1 and experts={num_experts}, or null for all")
        if token_mask is not None:
            if vocab_size is None:
                raise ConfigError("router.token_mask masks experts per token id: use it with the language model (model=lm)")
            if not 0.0 <= rare_share <= 1.0:
                raise ConfigError(f"router.rare_share={rare_share} must be between 0 and 1")
            self.mask_seed = layer_seed(0, layer_index)
            self.register_buffer("allowed_VE", torch.ones(vocab_size, num_experts, dtype=torch.bool))

    @property
    def needs_token_ids(self) -> bool:
        return self.token_mask is not None

    @torch.no_grad()
    def fit_token_mask(self, counts_V: Tensor) -> None:
        """MaskMoE's mask (Su et al. 2024) from each id's training count: the rarest
        `rare_share` of the ids the training split shows, and every id it never shows, get one
        expert each, dealt so their token mass is balanced across experts (the hash layers'
        balanced assignment); the other ids get `frequent_experts` = V experts each, drawn at
        random (fixed by the layer's seed) as in the paper, or every expert (V null)."""
        vocab = self.allowed_VE.shape[0]
        counts_V = torch.as_tensor(counts_V).flatten()
        if counts_V.numel() > vocab:
            raise ConfigError(f"router.token_mask: the data has {counts_V.numel()} token ids, the model's vocabulary {vocab}")
        frequency_V = torch.zeros(vocab, dtype=torch.float64)
        frequency_V[: counts_V.numel()] = counts_V.double()
        # The share counts ids the training split shows: a byte vocabulary has ~100 of 256,
        # and a share of all ids would pick only ids that never occur. Unseen ids are rare too.
        seen = (frequency_V > 0).nonzero().flatten()
        rarest_seen = seen[torch.argsort(frequency_V[seen], stable=True)[: round(self.rare_share * seen.numel())]]
        rare_V = torch.cat([(frequency_V == 0).nonzero().flatten(), rarest_seen])
        expert_of_id = frequency_balanced_key_map(frequency_V[rare_V], self.num_experts, self.mask_seed)
        self.allowed_VE.fill_(True)
        V, E = self.frequent_experts, self.num_experts
        if V is not None and V < E:
            draws_VE = torch.rand(vocab, E, generator=torch.Generator().manual_seed(self.mask_seed + 1))
            chosen_VV = draws_VE.topk(V, dim=1).indices
            self.allowed_VE.zero_()
            self.allowed_VE.scatter_(1, chosen_VV.to(self.allowed_VE.device), True)
        self.allowed_VE[rare_V] = False
        self.allowed_VE[rare_V, expert_of_id] = True

    def masked(self, logits_TE: Tensor, context: RoutingContext | None,
               fill: float = float("-inf")) -> tuple[Tensor, Tensor | None]:
        """The logits with `fill` (−inf) for the experts a token's id may not use, and the
        (T, E) allowed mask (None without `token_mask`)."""
        if self.token_mask is None:
            return logits_TE, None
        if context is None or context.token_ids_T is None:
            raise ConfigError("router.token_mask needs the token ids: use it with the language model (model=lm)")
        allowed_TE = self.allowed_VE[context.token_ids_T.to(logits_TE.device)]
        return logits_TE.masked_fill(~allowed_TE, fill), allowed_TE

    @property
    def experts_per_token(self) -> float:
        """Experts one token uses (before drops): what sets the active parameters."""
        return self.k

    @property
    def causal_safe(self) -> bool:
        """Capacity breaks per-token routing: whether a token keeps its expert depends on
        the other tokens of the batch, later positions included."""
        return self.capacity_factor is None and self.eval_capacity_factor is None

    def capacity(self, num_tokens: int) -> int | None:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return None if factor is None else expert_capacity(num_tokens, self.num_experts, self.k, factor)

    def plan(
        self,
        logits_TE: Tensor,
        probs_TE: Tensor,
        selection_TE: Tensor,
        gates_TE: Tensor,
        context: RoutingContext | None,
        active_TK: Tensor | None = None,
        load_estimate_E: Tensor | None = None,
        allowed_TE: Tensor | None = None,
    ) -> Routing:
        """Top-k of `selection_TE`, weights from `gates_TE` (renormalised if `normalize`).
        `allowed_TE` (a token mask): choices of experts not allowed for their token are
        skipped (no row output, not counted), as when a token has fewer allowed experts than k."""
        selected_TK = selection_TE.topk(self.k, dim=-1).indices
        if allowed_TE is not None:
            allowed_TK = allowed_TE.gather(1, selected_TK)
            active_TK = allowed_TK if active_TK is None else active_TK & allowed_TK
        raw_TK = gates_TE.gather(1, selected_TK)
        weights_TK = raw_TK / raw_TK.sum(dim=-1, keepdim=True) if self.normalize else raw_TK
        capacity = self.capacity(logits_TE.shape[0])
        # V-MoE's priority (Riquelme et al. 2021, Batch Prioritized Routing): the token's top gate as the router
        # scored it, before any renormalisation over the chosen experts.
        priority_T = raw_TK.max(dim=-1).values.detach() if self.batch_priority and capacity else None
        return token_choice_routing(
            logits_TE, probs_TE, selected_TK, weights_TK, capacity, priority_T, active_TK, load_estimate_E, context
        )

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, k={self.k}, normalize={self.normalize}, "
            f"capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}, "
            f"batch_priority={self.batch_priority}"
        )


class TopKRouter(TokenChoiceRouter):
    """Top-k routing (Shazeer et al. 2017; Mixtral; Switch, Fedus et al. 2021, is k=1).

    h = x W_g; scores p = softmax(h) (`score="softmax"`) or s = σ(h) (`score="sigmoid"`);
    each token takes the k largest scores with weights g_i = p_i, or with `normalize`
    g_i = p_i / Σ_selected p_j (for softmax equal to a softmax over the k selected logits).
    Dropless unless `capacity_factor` is set: then each expert keeps C = ⌈cf · k · T / E⌉
    assignments and the overflow is dropped (its token passes through the residual).
    For sigmoid scores the balance loss reads s normalised to sum to 1 per token.

    `token_mask="frequency"` (language models) is MaskMoE's routing mask (Su et al. 2024):
    every vocabulary id has a fixed set of allowed experts, and the others get logit −inf
    before the scores and the top-k. The rarest `rare_share` of the ids the training split
    shows (by count, fitted by the language task), and every id it never shows, get one
    expert each, dealt so their token mass is balanced across experts; the other ids get
    `frequent_experts` = V random experts each (fixed by the layer's seed), or every expert
    when V is null.
    A rare token's choices beyond its one expert are skipped (weight 0, no row counted).
    The mask is a buffer: checkpoints carry it.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        normalize: bool = True,
        score: str = "softmax",
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        batch_priority: bool = False,
        token_mask: str | None = None,
        rare_share: float = 0.5,
        frequent_experts: int | None = None,
        vocab_size: int | None = None,
        layer_index: int | None = None,
    ) -> None:
        super().__init__(num_experts, k, normalize, capacity_factor, eval_capacity_factor, batch_priority,
                         token_mask, rare_share, vocab_size, layer_index,
                         frequent_experts)
        if score not in ("softmax", "sigmoid"):
            raise ConfigError(f"router.score='{score}' is unknown: pick softmax or sigmoid")
        self.score = score
        self.gate = linear_gate(d_model, num_experts)

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> Routing:
        logits_TE, allowed_TE = self.masked(router_logits(x_TD, self.gate.weight), context)
        if self.score == "softmax":
            scores_TE = probs_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = torch.sigmoid(logits_TE)
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        return self.plan(logits_TE, probs_TE, scores_TE, scores_TE, context, allowed_TE=allowed_TE)


class GShardRouter(TokenChoiceRouter):
    """GShard top-2 (Lepikhin et al. 2020, Algorithm 1): e1 = argmax p, e2 = argmax of p
    without e1, g1 and g2 renormalised over the pair; in training the second expert is
    used only if 2·g2 > u, u ~ U(0, 1) (at eval both are used).

    The `balance` loss counts both choices (f_i is the share of all 2·T assignments that
    pick i), where the paper's Algorithm 1 counts the first choice only; both choices,
    counted before any drop, is the Switch/Mixtral convention and the one every token-choice
    router here shares."""

    normalize_configurable = False
    fixed_k = True  # MoELayer cannot re-count k for fine-grained or shared experts

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        batch_priority: bool = False,
        token_mask: str | None = None,
        rare_share: float = 0.5,
        frequent_experts: int | None = None,
        vocab_size: int | None = None,
        layer_index: int | None = None,
    ) -> None:
        if k != 2:
            raise ConfigError(f"router=gshard is top-2 by definition (router.k={k}): use router=topk for other k")
        super().__init__(num_experts, 2, True, capacity_factor, eval_capacity_factor, batch_priority, token_mask, rare_share, vocab_size, layer_index,
                         frequent_experts)
        self.gate = linear_gate(d_model, num_experts)

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> Routing:
        logits_TE, allowed_TE = self.masked(router_logits(x_TD, self.gate.weight), context)
        probs_TE = logits_TE.softmax(dim=-1)
        active_TK = None
        if self.training:
            top2_TK = probs_TE.topk(2, dim=-1).values
            second_weight_T = top2_TK[:, 1] / top2_TK.sum(-1)
            uniform_T = torch.rand_like(second_weight_T)
            active_TK = torch.stack([torch.ones_like(uniform_T, dtype=torch.bool), 2 * second_weight_T > uniform_T], 1)
        return self.plan(logits_TE, probs_TE, probs_TE, probs_TE, context, active_TK=active_TK, allowed_TE=allowed_TE)


class NoisyTopKRouter(TokenChoiceRouter):
    """Noisily gated top-k (Shazeer et al. 2017, eqs. 3-5 and 8-10).

    H = h + ε · softplus(x W_noise), ε ~ N(0, 1) in training only; the k largest H are
    kept and their weights are a softmax over them. The plan carries the differentiable
    load estimate Load_i = Σ_t Φ((h_t,i − kth_excluding(H_t, k, i)) / softplus((x_t W_noise)_i))
    for the `load` loss. W_g and W_noise start at zero, as in the paper.

    The noise std is softplus(x W_noise) + `noise_epsilon` (default 1e-2), a floor the paper's
    equations do not have: it comes from the authors' implementation, `noisy_top_k_gating`
    in tensor2tensor's `expert_utils.py`
    (https://github.com/tensorflow/tensor2tensor/blob/master/tensor2tensor/utils/expert_utils.py).
    It keeps the std, and the load estimator's division by it, away from 0 while W_noise is
    still 0 at the start.
    """

    expert_rows = ("gate.weight", "noise.weight")

    supported_losses = TOKEN_CHOICE_LOSSES | {"load"}
    normalize_configurable = False

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        batch_priority: bool = False,
        noise_epsilon: float = 1e-2,
        token_mask: str | None = None,
        rare_share: float = 0.5,
        frequent_experts: int | None = None,
        vocab_size: int | None = None,
        layer_index: int | None = None,
    ) -> None:
        super().__init__(num_experts, k, True, capacity_factor, eval_capacity_factor, batch_priority, token_mask, rare_share, vocab_size, layer_index,
                         frequent_experts)
        if k == num_experts:
            raise ConfigError("noisy_topk needs router.k < experts: with k = experts nothing is selected")
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.noise = nn.Linear(d_model, num_experts, bias=False)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.noise.weight)
        self.noise_epsilon = noise_epsilon

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> Routing:
        # Masked logits are a finite −1e9 here, not −inf: the load estimate takes differences
        # of logits and divides them by the noise std, and ∞ − ∞ or 0·∞ would put NaN into its
        # gradient even where the mask zeroes it. exp(−1e9) is 0 in fp32: same probabilities.
        clean_TE, allowed_TE = self.masked(router_logits(x_TD, self.gate.weight), context, fill=-1e9)
        if not self.training:
            probs_TE = clean_TE.softmax(-1)
            return self.plan(clean_TE, probs_TE, clean_TE, probs_TE, context, allowed_TE=allowed_TE)
        noise_std_TE = F.softplus(router_logits(x_TD, self.noise.weight)) + self.noise_epsilon
        noisy_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
        # kth_excluding: for an expert inside the top k, the (k+1)-th largest; else the k-th.
        top_TK1 = noisy_TE.topk(self.k + 1, dim=-1).values
        kth_T1, kplus1_T1 = top_TK1[:, self.k - 1 : self.k], top_TK1[:, self.k :]
        threshold_TE = torch.where(noisy_TE >= kth_T1, kplus1_T1, kth_T1)
        # Φ via ndtr: torch.distributions.Normal validates its input, a host sync per step.
        load_TE = torch.special.ndtr((clean_TE - threshold_TE) / noise_std_TE)
        if allowed_TE is not None:  # a masked expert is never chosen
            load_TE = load_TE * allowed_TE
        probs_TE = noisy_TE.softmax(-1)
        return self.plan(clean_TE, probs_TE, noisy_TE, probs_TE, context, load_estimate_E=load_TE.sum(0),
                         allowed_TE=allowed_TE)


class CosineRouter(TokenChoiceRouter):
    """Cosine routing (X-MoE, Chi et al. 2022): s_t,i = ⟨W_p x_t, e_i⟩ / (τ ‖W_p x_t‖ ‖e_i‖),
    W_p a projection to `dim` (low) dimensions, e_i learned expert embeddings, τ a learned
    temperature (its log clamped so τ ≥ `min_temperature`); top-k of softmax(s).

    No z-loss: the logits are bounded by 1/τ already, so a z-loss could only push τ up
    (flattening the routing), and X-MoE trains without one. A weighted `zloss` is skipped
    with MoELayer's warning, like any loss a router does not support.
    """

    expert_rows = ("expert_embeddings",)  # not `project`: its rows are projection dims

    supported_losses = TOKEN_CHOICE_LOSSES - {"zloss"}

    def no_weight_decay(self) -> set[str]:
        """timm's convention: parameters AdamW should not decay (L2-normalised in forward)."""
        return {"expert_embeddings"}

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        normalize: bool = True,
        dim: int = 16,
        init_temperature: float = 0.07,
        min_temperature: float = 0.01,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        batch_priority: bool = False,
        token_mask: str | None = None,
        rare_share: float = 0.5,
        frequent_experts: int | None = None,
        vocab_size: int | None = None,
        layer_index: int | None = None,
    ) -> None:
        super().__init__(num_experts, k, normalize, capacity_factor, eval_capacity_factor, batch_priority, token_mask, rare_share, vocab_size, layer_index,
                         frequent_experts)
        if init_temperature <= 0 or min_temperature <= 0:
            raise ConfigError("router.init_temperature and router.min_temperature must be > 0")
        self.project = nn.Linear(d_model, dim, bias=False)
        self.expert_embeddings = nn.Parameter(torch.randn(num_experts, dim) * dim**-0.5)
        self.log_temperature = nn.Parameter(torch.tensor([math.log(init_temperature)]))  # 1-D: FSDP shards no scalars
        self.min_log_temperature = math.log(min_temperature)

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.clamp(min=self.min_log_temperature).exp()

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> Routing:
        projected_TR = F.normalize(router_logits(x_TD, self.project.weight), dim=-1)
        experts_ER = F.normalize(self.expert_embeddings.float(), dim=-1)
        logits_TE, allowed_TE = self.masked(router_logits(projected_TR, experts_ER) / self.temperature, context)
        probs_TE = logits_TE.softmax(-1)
        return self.plan(logits_TE, probs_TE, probs_TE, probs_TE, context, allowed_TE=allowed_TE)

