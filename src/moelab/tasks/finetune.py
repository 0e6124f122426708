"""Fine-tuning recipes: freeze named parameter groups, and turn auxiliary losses down.

Groups (by what a parameter belongs to, in any moelab model):
- `experts`: routed and shared experts of every MoE layer;
- `router`: every MoE layer's router;
- `attention`: the attention modules (`attn`) of every block;
- `embeddings`: token embeddings (and an LM head tied to them), the ViT's patch embedding,
  position embedding and class token;
- `non_expert`: everything but the experts (routers included).
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from moelab.moe.errors import ConfigError
from moelab.moe.layer import MoELayer

GROUPS = ("experts", "router", "attention", "embeddings", "non_expert")


def parameter_groups(model: nn.Module) -> dict[str, set[str]]:
    """Group name → names of the model's parameters in it."""
    names = [name for name, _ in model.named_parameters()]
    moe = [name for name, module in model.named_modules() if isinstance(module, MoELayer)]

    def under(prefixes: Iterable[str]) -> set[str]:
        prefixes = tuple(prefixes)
        return {n for n in names if n.startswith(prefixes)}

    experts = under(f"{m}.{part}." for m in moe for part in ("experts", "shared_experts"))
    embedding_modules = [name for name, module in model.named_modules() if isinstance(module, nn.Embedding)]
    embeddings = under(f"{m}." for m in embedding_modules) | {
        n for n in names if n.rsplit(".", 1)[-1] in ("pos_embed", "cls_token") or ".patch_embed." in f".{n}"
    }
    return {
        "experts": experts,
        "router": under(f"{m}.router." for m in moe),
        "attention": {n for n in names if ".attn." in f".{n}"},
        "embeddings": embeddings,
        "non_expert": set(names) - experts,
    }


def freeze(model: nn.Module, groups: Iterable[str]) -> list[str]:
    """Stop gradients to the parameters of `groups`; returns the frozen names. One-line
    errors for an unknown group and for freezing everything."""
    groups = list(groups)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ConfigError(f"task.freeze={groups}: unknown group {unknown[0]!r}, pick from {', '.join(GROUPS)}")
    by_group = parameter_groups(model)
    frozen = set().union(*(by_group[g] for g in groups)) if groups else set()
    params = dict(model.named_parameters())
    if groups and frozen >= set(params):
        raise ConfigError(f"task.freeze={groups} freezes every parameter: nothing would train")
    for name in frozen:
        params[name].requires_grad_(False)
    return sorted(frozen)
