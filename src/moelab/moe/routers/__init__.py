"""Routing rules, one class each, a file per family. Every router maps tokens (T, D) to a
routing plan (moelab.moe.routing).

Each router declares `kind` (token_choice, dense, expert_choice, soft, smear, hash), whether
it is `causal_safe` (a token's routing depends on that token alone, so it may serve a causal
language model), and the auxiliary losses that mean something for it (`supported_losses`).
Router math runs in fp32 whatever the compute dtype (ST-MoE, Zoph et al. 2022, sec. 3.3).

- token_choice.py: top-k (Switch is k=1), GShard top-2, noisy top-k, cosine (X-MoE)
- balanced.py: balanced without an auxiliary loss: aux_free (DeepSeek-V3), Sinkhorn
- hash.py: hash layers; expert_choice.py; dense.py; soft.py: Soft MoE and SMEAR
- base.py: what they share (fp32 logits, the gate's init, balanced key maps)

The classes are importable from here (`moelab.moe.routers.TopKRouter`): the router
configs' `_target_`s, and the configs stored in checkpoints, name them so.
"""

from moelab.moe.routers.balanced import AuxFreeRouter, SinkhornRouter
from moelab.moe.routers.dense import DenseRouter
from moelab.moe.routers.expert_choice import ExpertChoiceRouter
from moelab.moe.routers.hash import HashRouter
from moelab.moe.routers.soft import SmearRouter, SoftMoERouter
from moelab.moe.routers.token_choice import (
    CosineRouter,
    GShardRouter,
    NoisyTopKRouter,
    TokenChoiceRouter,
    TopKRouter,
)

__all__ = [
    "AuxFreeRouter",
    "CosineRouter",
    "DenseRouter",
    "ExpertChoiceRouter",
    "GShardRouter",
    "HashRouter",
    "NoisyTopKRouter",
    "SinkhornRouter",
    "SmearRouter",
    "SoftMoERouter",
    "TokenChoiceRouter",
    "TopKRouter",
]
