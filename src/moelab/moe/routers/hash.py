"""Hash layers (Roller et al. 2021): a fixed random map from keys (token ids or positions) to
experts, and the balanced maps it is built from."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.moe.dispatch import token_choice_routing
from moelab.moe.errors import ConfigError, check_num_experts
from moelab.moe.routers.base import (
    balanced_key_map,
    frequency_balanced_key_map,
    layer_seed,
)
from moelab.moe.routing import Routing, RoutingContext


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
    expert_rows: tuple[str, ...] = ()  # its key → expert map is remapped, not merged
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

