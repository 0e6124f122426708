"""Routing rules, one class each. Every router maps tokens (T, D) to a routing plan.

Each router declares `kind` (token_choice, dense, expert_choice, soft, hash), whether it
is `causal_safe` (a token's routing depends on that token alone, so it may serve a causal
language model), and the auxiliary losses that mean something for it (`supported_losses`).
Router math runs in fp32 whatever the compute dtype (ST-MoE, Zoph et al. 2022, sec. 3.3).
"""

from __future__ import annotations

import heapq
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.moe.dispatch import expert_capacity, token_choice_routing
from moelab.moe.errors import ConfigError, check_num_experts
from moelab.moe.routing import MergedRouting, Routing, RoutingContext, SoftRouting

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


def _check_factor(name: str, factor: float | None) -> None:
    if factor is not None and factor <= 0:
        raise ConfigError(f"router.{name}={factor} must be > 0, or null for dropless routing")


class TokenChoiceRouter(nn.Module):
    """Shared machinery of routers where each token picks k experts: k, weight
    renormalisation, capacity (train and eval factors) and batch priority routing.

    Subclasses compute scores and call `plan(...)`.
    """

    kind = "token_choice"
    supported_losses = TOKEN_CHOICE_LOSSES
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
        _check_factor("capacity_factor", capacity_factor)
        _check_factor("eval_capacity_factor", eval_capacity_factor)
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
        self.token_mask, self.rare_share = token_mask, rare_share
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
        balanced assignment); the other ids get every expert."""
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
    every expert.
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
        vocab_size: int | None = None,
        layer_index: int | None = None,
    ) -> None:
        super().__init__(num_experts, k, normalize, capacity_factor, eval_capacity_factor, batch_priority,
                         token_mask, rare_share, vocab_size, layer_index)
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
        vocab_size: int | None = None,
        layer_index: int | None = None,
    ) -> None:
        if k != 2:
            raise ConfigError(f"router=gshard is top-2 by definition (router.k={k}): use router=topk for other k")
        super().__init__(num_experts, 2, True, capacity_factor, eval_capacity_factor, batch_priority, token_mask, rare_share, vocab_size, layer_index)
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
        vocab_size: int | None = None,
        layer_index: int | None = None,
    ) -> None:
        super().__init__(num_experts, k, True, capacity_factor, eval_capacity_factor, batch_priority, token_mask, rare_share, vocab_size, layer_index)
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
        vocab_size: int | None = None,
        layer_index: int | None = None,
    ) -> None:
        super().__init__(num_experts, k, normalize, capacity_factor, eval_capacity_factor, batch_priority, token_mask, rare_share, vocab_size, layer_index)
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
        logits_TE, allowed_TE = self.masked(projected_TR @ experts_ER.t() / self.temperature, context)
        probs_TE = logits_TE.softmax(-1)
        return self.plan(logits_TE, probs_TE, probs_TE, probs_TE, context, allowed_TE=allowed_TE)


class AuxFreeRouter(TokenChoiceRouter):
    """Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3).

    s = σ(h); experts are selected by top-k of s_i + b_i, weighted by s_i / Σ_selected s_j
    (the bias b is not in the weights). After each optimizer step `update_bias()` sets
    b_i ← b_i + γ · sign(mean_j c_j − c_i), c_i the tokens routed to i since the last
    update, counted before any capacity drop (summed over ranks when torch.distributed is
    initialised). b is a buffer.
    """

    normalize_configurable = False

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        update_rate: float = 1e-3,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        token_mask: str | None = None,
        rare_share: float = 0.5,
        vocab_size: int | None = None,
        layer_index: int | None = None,
    ) -> None:
        super().__init__(num_experts, k, True, capacity_factor, eval_capacity_factor, False, token_mask, rare_share, vocab_size, layer_index)
        if update_rate < 0:
            raise ConfigError(f"router.update_rate={update_rate} must be >= 0")
        self.update_rate = update_rate
        self.gate = linear_gate(d_model, num_experts)
        self.register_buffer("expert_bias_E", torch.zeros(num_experts))
        self.register_buffer("load_since_update_E", torch.zeros(num_experts), persistent=False)

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> Routing:
        logits_TE, allowed_TE = self.masked(router_logits(x_TD, self.gate.weight), context)
        scores_TE = torch.sigmoid(logits_TE)
        selection_TE = scores_TE.detach() + self.expert_bias_E
        if allowed_TE is not None:  # the bias must not lift a masked expert (σ(−∞) = 0) into the top k
            selection_TE = selection_TE.masked_fill(~allowed_TE, float("-inf"))
        plan = self.plan(logits_TE, scores_TE / scores_TE.sum(-1, keepdim=True), selection_TE, scores_TE, context,
                         allowed_TE=allowed_TE)
        if self.training:
            chosen = plan.selected_experts_TK.reshape(-1)
            counts = torch.ones_like(chosen, dtype=self.load_since_update_E.dtype)
            if allowed_TE is not None:  # a masked choice is no assignment
                counts = allowed_TE.gather(1, plan.selected_experts_TK).reshape(-1).to(counts.dtype)
            self.load_since_update_E.scatter_add_(0, chosen, counts)
        return plan

    @torch.no_grad()
    def update_bias(self) -> None:
        """One bias step from the load seen since the last call (call after optimizer.step)."""
        load_E = self.load_since_update_E
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load_E)
        self.expert_bias_E += self.update_rate * torch.sign(load_E.mean() - load_E)
        load_E.zero_()


class SinkhornRouter(TokenChoiceRouter):
    """Balanced assignment by Sinkhorn normalisation (as in Megatron-Core; in the spirit of
    BASE layers, Lewis et al. 2021). In training, K = exp(h) is scaled alternately by rows
    and columns until rows sum to 1/T and columns to 1/E (within `tolerance`, at most
    `max_iterations`); experts are the top-k of the scaled matrix. At eval: plain top-k.

    Weights: for k = 1, σ(h_i) of the chosen expert, BASE layers' gate (Lewis et al. 2021,
    eq. 2: y = x + σ(x·w_i) f_i(x)) and Megatron-Core's; for k > 1, the softmax
    probabilities p_i of the chosen experts (renormalised over them with `normalize`).
    """

    # The guard in the scaling denominators (Megatron-Core has one too): an expert whose
    # exp(h) all underflow gets a zero column instead of 0/0 = NaN everywhere.
    EPSILON = 1e-8

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 1,
        normalize: bool = False,
        max_iterations: int = 50,
        tolerance: float = 1e-3,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        token_mask: str | None = None,
        rare_share: float = 0.5,
        vocab_size: int | None = None,
        layer_index: int | None = None,
    ) -> None:
        super().__init__(num_experts, k, normalize, capacity_factor, eval_capacity_factor, False, token_mask, rare_share, vocab_size, layer_index)
        self.max_iterations, self.tolerance = max_iterations, tolerance
        self.gate = linear_gate(d_model, num_experts)

    @property
    def causal_safe(self) -> bool:
        return False  # the training assignment couples every token of the batch

    @classmethod
    @torch.no_grad()
    def sinkhorn(cls, logits_TE: Tensor, max_iterations: int, tolerance: float) -> Tensor:
        """Scale exp(logits) to rows summing to 1/T and columns to 1/E.

        Each row is shifted by its own maximum first: exp(h_t − max_t h_t) differs from
        exp(h_t) by a factor per row, which the row scaling absorbs, so the iteration has
        the same fixed point while every row keeps an entry of 1 (no row underflows to all
        zeros). The scalings divide by E·(column sum) + ε and T·(row sum) + ε: Megatron-Core's
        ε guard, added after the sums are scaled to about 1, so it stays negligible at any
        batch size (Megatron adds it to the raw sums, which shrink as 1/T)."""
        num_tokens, num_experts = logits_TE.shape
        matrix_TE = (logits_TE - logits_TE.max(dim=1, keepdim=True).values).exp()
        for _ in range(max_iterations):
            matrix_TE = matrix_TE / (matrix_TE.sum(0, keepdim=True) * num_experts + cls.EPSILON)
            row_error = (matrix_TE.sum(1) * num_tokens - 1).abs().max()
            if row_error < tolerance:
                break
            matrix_TE = matrix_TE / (matrix_TE.sum(1, keepdim=True) * num_tokens + cls.EPSILON)
        return matrix_TE

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> Routing:
        logits_TE, allowed_TE = self.masked(router_logits(x_TD, self.gate.weight), context)
        probs_TE = logits_TE.softmax(-1)
        selection_TE = probs_TE
        if self.training:
            selection_TE = self.sinkhorn(logits_TE, self.max_iterations, self.tolerance)
        gates_TE = torch.sigmoid(logits_TE) if self.k == 1 else probs_TE
        return self.plan(logits_TE, probs_TE, selection_TE, gates_TE, context, allowed_TE=allowed_TE)


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


class HashRouter(nn.Module):
    """Hash layers (Roller et al. 2021): expert(t) = π(key_t) for a fixed random map π from
    keys to experts, k = 1, weight 1.

    `key="token_id"` hashes token ids (language models pass them), `key="position"` the
    position in the sequence (patch position for vision); `"auto"` takes token ids where the
    model has a vocabulary and positions otherwise. The map covers the real keys: K =
    `num_keys`, or the model's `vocab_size` (token ids) or `num_positions` (positions), which
    models pass to routers that take them (see MoELayer). Keys ≥ K wrap around (key mod K).

    `balance="uniform"`: every expert gets ⌊K/E⌋ or ⌈K/E⌉ keys. `balance="frequency"`
    (token ids): the paper's balanced assignment by key frequency in the training data,
    set by `fit_key_frequencies(counts)` before training (the language task does it from
    the training split); until then the map is the uniform one. Each layer draws its own
    map, from (`seed`, `layer_index`). The map is a buffer, so checkpoints carry it.
    """

    kind = "hash"
    supported_losses = frozenset()
    causal_safe = True
    experts_per_token = 1
    KEYS = ("auto", "token_id", "position")
    BALANCES = ("uniform", "frequency")

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        key: str = "auto",
        num_keys: int | None = None,
        balance: str = "uniform",
        seed: int = 0,
        layer_index: int | None = None,
        vocab_size: int | None = None,
        num_positions: int | None = None,
    ) -> None:
        super().__init__()
        check_num_experts(num_experts)
        if key not in self.KEYS:
            raise ConfigError(f"router.key='{key}' is unknown: pick {', '.join(self.KEYS)}")
        if balance not in self.BALANCES:
            raise ConfigError(f"router.balance='{balance}' is unknown: pick {' or '.join(self.BALANCES)}")
        if key == "auto" and num_keys is None and vocab_size is None and num_positions is None:
            raise ConfigError(
                "router=hash with router.key=auto cannot tell what to hash: the model passes neither vocab_size "
                "nor num_positions (MoELayer's router_facts); set router.key and router.num_keys"
            )
        if key == "auto":
            key = "token_id" if vocab_size is not None else "position"
        if balance == "frequency" and key != "token_id":
            raise ConfigError("router.balance=frequency balances token-id frequencies: use it with router.key=token_id")
        if num_keys is None:
            num_keys = vocab_size if key == "token_id" else num_positions
        if num_keys is None and key == "token_id":
            raise ConfigError(
                "router=hash with router.key=token_id needs the vocabulary size, and this model has none: "
                "on images use router.key=position (or auto); elsewhere set router.num_keys"
            )
        if num_keys is None:
            raise ConfigError(
                "router=hash with router.key=position needs the number of positions: set router.num_keys "
                "(the sequence length)"
            )
        if num_keys < 1:
            raise ConfigError(f"router.num_keys={num_keys} must be >= 1")
        self.num_experts, self.key, self.num_keys, self.balance = num_experts, key, num_keys, balance
        self.seed = layer_seed(seed, layer_index)
        self.register_buffer("expert_of_key", balanced_key_map(num_keys, num_experts, self.seed))

    @property
    def needs_token_ids(self) -> bool:
        return self.key == "token_id"

    @torch.no_grad()
    def fit_key_frequencies(self, counts_K: Tensor) -> None:
        """Rebuild the map from each key's count in the training data (balance="frequency")."""
        counts_K = torch.as_tensor(counts_K).flatten()
        if counts_K.numel() > self.num_keys:
            raise ConfigError(
                f"router=hash: the data has {counts_K.numel()} token ids but router.num_keys={self.num_keys}"
            )
        frequency_K = torch.zeros(self.num_keys, dtype=torch.float64)
        frequency_K[: counts_K.numel()] = counts_K.double()
        self.expert_of_key.copy_(frequency_balanced_key_map(frequency_K, self.num_experts, self.seed))

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> Routing:
        if self.key == "token_id":
            if context is None or context.token_ids_T is None:
                raise ConfigError(
                    "router=hash with router.key=token_id needs token ids: use it with a language model, "
                    "or set router.key=position"
                )
            keys_T = context.token_ids_T.to(x_TD.device)
        else:
            seq_len = x_TD.shape[0] if context is None else context.seq_len
            keys_T = torch.arange(x_TD.shape[0], device=x_TD.device) % seq_len
        selected_T1 = self.expert_of_key[keys_T % self.num_keys].unsqueeze(1)
        probs_TE = F.one_hot(selected_T1.squeeze(1), self.num_experts).float()
        weights_T1 = torch.ones_like(selected_T1, dtype=torch.float32)
        return token_choice_routing(torch.zeros_like(probs_TE), probs_TE, selected_T1, weights_T1, context=context)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, key={self.key}, num_keys={self.num_keys}, balance={self.balance}, seed={self.seed}"


class DenseRouter(nn.Module):
    """Dense softmax gating: every expert on every token, y_t = Σ_i p_t,i f_i(x_t)."""

    kind = "dense"
    supported_losses = frozenset({"zloss", "importance", "entropy"})
    causal_safe = True

    @property
    def experts_per_token(self) -> int:
        return self.num_experts

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        check_num_experts(num_experts)
        self.num_experts = num_experts
        self.gate = linear_gate(d_model, num_experts)

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> Routing:
        logits_TE = router_logits(x_TD, self.gate.weight)
        probs_TE = logits_TE.softmax(-1)
        every_TE = torch.arange(self.num_experts, device=x_TD.device).expand(x_TD.shape[0], -1)
        return token_choice_routing(logits_TE, probs_TE, every_TE, probs_TE, context=context)


class ExpertChoiceRouter(nn.Module):
    """Expert choice (Zhou et al. 2022): S = softmax(h) over experts; each expert takes the
    c = ⌈cf · T / E⌉ tokens with the largest S[:, i], weighted by those S values. Every
    expert gets exactly c tokens; a token may get several experts or none (counted in
    the plan's `unrouted_fraction`)."""

    kind = "expert_choice"
    supported_losses = frozenset({"zloss", "entropy"})
    causal_safe = False  # which tokens an expert takes depends on the whole batch

    @property
    def experts_per_token(self) -> float:
        """On average: E experts take c = cf·T/E tokens each."""
        return self.capacity_factor

    def __init__(self, d_model: int, num_experts: int, capacity_factor: float = 1.0) -> None:
        super().__init__()
        check_num_experts(num_experts)
        if capacity_factor <= 0:
            raise ConfigError(f"router.capacity_factor={capacity_factor} must be > 0")
        self.num_experts, self.capacity_factor = num_experts, capacity_factor
        self.gate = linear_gate(d_model, num_experts)

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> Routing:
        num_tokens = x_TD.shape[0]
        logits_TE = router_logits(x_TD, self.gate.weight)
        probs_TE = logits_TE.softmax(-1)
        capacity = min(num_tokens, math.ceil(self.capacity_factor * num_tokens / self.num_experts))
        gates_CE, tokens_CE = probs_TE.topk(capacity, dim=0)
        sizes_E = torch.full((self.num_experts,), capacity, dtype=torch.long, device=x_TD.device)
        return Routing(
            token_index_N=tokens_CE.t().reshape(-1),
            combine_weight_N=gates_CE.t().reshape(-1),
            group_sizes_E=sizes_E,
            tokens_per_expert_E=sizes_E,
            router_logits_TE=logits_TE,
            router_probs_TE=probs_TE,
            context=context,
        )


class SoftMoERouter(nn.Module):
    """Soft MoE (Puigcerver et al. 2023), per sequence X ∈ R^{m×d} and S = E·p slots:
    logits L = scale · l2norm_rows(X) · l2norm_cols(Φ), Φ ∈ R^{d×S} learned, `scale` a
    learned scalar (init 1); dispatch weights D = softmax of L over tokens, combine weights
    C = softmax of L over slots; slot s goes to expert ⌊s / p⌋. `num_slots`, if given,
    sets S (a multiple of E) in place of `slots_per_expert`."""

    kind = "soft"
    supported_losses = frozenset()
    causal_safe = False  # every slot mixes every token of the sequence

    def __init__(self, d_model: int, num_experts: int, slots_per_expert: int = 1, num_slots: int | None = None) -> None:
        super().__init__()
        check_num_experts(num_experts)
        if num_slots is not None:
            if slots_per_expert != 1:
                raise ConfigError("set router.num_slots or router.slots_per_expert, not both")
            if num_slots < num_experts or num_slots % num_experts:
                raise ConfigError(f"router.num_slots={num_slots} must be a positive multiple of experts={num_experts}")
            slots_per_expert = num_slots // num_experts
        if slots_per_expert < 1:
            raise ConfigError(f"router.slots_per_expert={slots_per_expert} must be >= 1")
        self.num_experts, self.slots_per_expert = num_experts, slots_per_expert
        self.slot_embeddings_DS = nn.Parameter(torch.randn(d_model, num_experts * slots_per_expert) * d_model**-0.5)
        self.scale = nn.Parameter(torch.ones(1))  # 1-D: FSDP shards no scalars

    def no_weight_decay(self) -> set[str]:
        """timm's convention: parameters AdamW should not decay (L2-normalised in forward)."""
        return {"slot_embeddings_DS"}

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> SoftRouting:
        num_sequences = 1 if context is None else context.num_sequences
        x_BMD = x_TD.float().reshape(num_sequences, -1, x_TD.shape[-1])
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_BMS = self.scale * torch.einsum(
                "bmd,ds->bms", F.normalize(x_BMD, dim=-1), F.normalize(self.slot_embeddings_DS.float(), dim=0)
            )
        return SoftRouting(
            dispatch_BMS=logits_BMS.softmax(dim=1),
            combine_BMS=logits_BMS.softmax(dim=2),
            num_experts=self.num_experts,
            context=context,
        )


class SmearRouter(nn.Module):
    """SMEAR (Muqeeth et al. 2023): soft merging of experts with adaptive routing. The router
    reads the mean of a sequence's inputs, x̄ (or, with `per="token"`, each token's own x),
    p = softmax(x̄ W_gᵀ), and the layer runs one FFN whose parameters are Σ_i p_i W_i (for
    every weight and bias of the experts), so its cost is one expert's FFN plus the merge,
    and the router gets gradients through the merged weights, with no estimator.

    The per-sequence form (the paper's) mixes a whole sequence into the routing of each of
    its tokens: not causal-safe, so the causal LM refuses it; `per="token"` is.
    Initialisation: MoELayer draws each expert's weights sqrt(E) wider than one FFN's, so the
    merged FFN starts at the dense FFN's scale (at even p, Σ_i p_i W_i has std σ/sqrt(E))."""

    kind = "smear"
    supported_losses = frozenset({"zloss", "entropy"})
    experts_per_token = 1

    def __init__(self, d_model: int, num_experts: int, per: str = "sequence") -> None:
        super().__init__()
        check_num_experts(num_experts)
        if per not in ("sequence", "token"):
            raise ConfigError(f"router.per={per!r}: SMEAR merges the experts per sequence or per token")
        self.num_experts, self.per = num_experts, per
        self.causal_safe = per == "token"
        self.gate = linear_gate(d_model, num_experts)

    @property
    def merged_init_gain(self) -> float:
        return float(self.num_experts) ** 0.5

    def forward(self, x_TD: Tensor, context: RoutingContext | None = None) -> MergedRouting:
        if self.per == "token":
            logits_TE = router_logits(x_TD, self.gate.weight)
            probs_TE = logits_TE.softmax(dim=-1)
            return MergedRouting(logits_TE, probs_TE, probs_TE, per_token=True, context=context)
        num_sequences = 1 if context is None else context.num_sequences
        x_BLD = x_TD.reshape(num_sequences, -1, x_TD.shape[-1])
        logits_BE = router_logits(x_BLD.float().mean(1), self.gate.weight)
        probs_BE = logits_BE.softmax(dim=-1)
        seq_len = x_BLD.shape[1]
        return MergedRouting(logits_BE.repeat_interleave(seq_len, 0), probs_BE.repeat_interleave(seq_len, 0), probs_BE,
                             per_token=False, context=context)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, per={self.per}"
