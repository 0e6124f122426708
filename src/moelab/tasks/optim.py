"""AdamW with weight decay on matrices only (fused where the device has the kernel), and a
linear warm-up into a cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from moelab.moe.errors import ConfigError


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices and expert weight stacks (ndim ≥ 2); not biases, norms, scalars,
    nor what a module's `no_weight_decay()` names (timm's convention: position embeddings,
    L2-normalised router embeddings)."""
    exempt = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if callable(getattr(module, "no_weight_decay", None))
        for name in module.no_weight_decay()
    }
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and name not in exempt else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(groups: list[dict], lr: float, betas: tuple[float, float]) -> tuple[torch.optim.AdamW, bool]:
    """(AdamW over `groups`, whether it is torch's fused one). The fused kernel updates every
    parameter in a few launches and skips a step on the device when `optimizer.found_inf`
    is 1 (the divergence guard's flag); where it does not run (a device without it,
    parameters it does not take) the multi-tensor implementation serves."""
    try:
        return torch.optim.AdamW([dict(g) for g in groups], lr=lr, betas=betas, fused=True), True
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW([dict(g) for g in groups], lr=lr, betas=betas), False


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1):
    """LambdaLR: linear warm-up from 0 over `warmup_steps`, then cosine down to `min_lr_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_optimizer_hparams(lr: object, weight_decay: object, betas: object, warmup_steps: object, min_lr_ratio: object) -> None:
    """One-line errors for optimizer settings that would train wrongly or fail inside torch."""
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not number(lr) or lr <= 0:
        raise ConfigError(f"task.lr={lr} must be a positive number")
    if not number(weight_decay) or weight_decay < 0:
        raise ConfigError(f"task.weight_decay={weight_decay} must be a number >= 0")
    if isinstance(betas, str) or not (hasattr(betas, "__len__") and len(betas) == 2 and all(number(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"task.betas={betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ConfigError(f"task.warmup_steps={warmup_steps} must be an integer >= 0")
    if not number(min_lr_ratio) or not 0 <= min_lr_ratio <= 1:
        raise ConfigError(f"task.min_lr_ratio={min_lr_ratio} must be in [0, 1]")
