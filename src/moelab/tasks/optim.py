"""AdamW with weight decay on matrices only, and a linear warm-up into a cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices and expert weight stacks (ndim ≥ 2); not biases, norms or embeddings' scalars."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1):
    """LambdaLR: linear warm-up from 0 over `warmup_steps`, then cosine down to `min_lr_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
