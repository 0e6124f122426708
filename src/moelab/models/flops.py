"""What a model computes, counted on one forward pass: torch's FlopCounterMode (matmuls,
convolutions, attention; elementwise work is not counted), with the grouped matmul's formula
registered (torch does not count `_grouped_mm` by itself). `ffn_flops_ratio` compares an
arm's feed-forward FLOPs per token with its dense twin's (the same config with
`model.moe_every=0`): the number every study states beside its results."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from moelab.models.build import build_model

# Modules whose FLOPs are the FFN's: the LM's `ffn`, the ViT's (timm) `mlp`.
FFN_NAMES = ("ffn", "mlp")


@functools.cache
def _register_grouped_mm() -> None:
    @register_flop_formula(torch.ops.aten._grouped_mm)
    def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        """2·M·K·N over the groups: (M, K) × (E, K, N) (rows split among the groups), or
        (K, M) × (M, N) → (E, K, N) (the shared dimension split: a weight gradient)."""
        if len(a_shape) == 2 and len(b_shape) == 3:
            return 2 * a_shape[0] * a_shape[1] * b_shape[2]
        if len(a_shape) == 2 and len(b_shape) == 2:
            return 2 * a_shape[0] * a_shape[1] * b_shape[1]
        if len(a_shape) == 3 and len(b_shape) == 3:
            return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
        return 2 * a_shape[-2] * a_shape[-1] * b_shape[-1]


def forward_flops(model: nn.Module, batch: Tensor) -> dict[str, int]:
    """{"total": FLOPs of `model(batch)`, "ffn": those inside its FFN modules (`*.ffn`,
    `*.mlp`, not nested in another)}, counted (no backward)."""
    _register_grouped_mm()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(batch)
    per_module = counter.get_flop_counts()
    ffn = 0
    for name, counts in per_module.items():
        parts = name.split(".")
        if parts[-1] in FFN_NAMES and not any(p in FFN_NAMES for p in parts[:-1]):
            ffn += sum(counts.values())
    return {"total": counter.get_total_flops(), "ffn": ffn}


MODEL_KEYS = ("model", "router", "expert", "loss", "data", "experts", "seed")


def model_config(config: Mapping[str, Any] | DictConfig) -> DictConfig:
    """The parts of a run's config that build its model (and size its batch), resolved."""
    def plain(value: Any) -> Any:
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value

    return OmegaConf.create({key: plain(config[key]) for key in MODEL_KEYS if key in config})


def dense_twin(config: Mapping[str, Any] | DictConfig) -> DictConfig:
    """The same config with no MoE layer: `model.moe_every=0`, no explicit layers."""
    cfg = model_config(config)
    with open_dict(cfg):
        cfg.model.moe_every, cfg.model.moe_layers = 0, None
        if "moe_last" in cfg.model:
            cfg.model.moe_last = None
    return cfg


def example_batch(config: Mapping[str, Any] | DictConfig, model: nn.Module, size: int = 2) -> Tensor:
    """A batch of the shape the config's data yields: images (vision) or token ids (LM)."""
    data = config["data"]
    if hasattr(model, "vocab_size"):
        return torch.randint(0, int(model.vocab_size), (size, int(data["seq_len"])))
    image = int(data["image_size"])
    return torch.randn(size, int(data["in_chans"]), image, image)


def ffn_flops_ratio(config: Mapping[str, Any] | DictConfig) -> dict[str, float]:
    """{"ffn": the arm's FFN FLOPs per token ÷ its dense twin's, "model": the whole forward's
    ratio}, counted on one training-mode forward of each (random weights and inputs: the
    compute of a routing plan does not depend on the data; capacity buffers count in full,
    at the training capacity factor)."""
    torch.manual_seed(0)
    config = model_config(config)
    arm = build_model(config).train()
    twin = build_model(dense_twin(config)).train()
    batch = example_batch(config, arm)
    flops, twin_flops = forward_flops(arm, batch), forward_flops(twin, batch)
    return {"ffn": flops["ffn"] / twin_flops["ffn"], "model": flops["total"] / twin_flops["total"]}
