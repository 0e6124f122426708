"""Helpers the expert callbacks share: when to record, where to write, how to name a layer."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from moelab.moe.errors import ConfigError
from moelab.moe.layer import MoELayer, moe_layers


def check_every_n(name: str, value: int | None) -> int | None:
    """Validate an `every_n_*` knob: None (follow the trainer) or a positive int."""
    if value is not None and value < 1:
        raise ConfigError(f"{name}={value} must be >= 1, or null to follow trainer.log_every_n_steps")
    return value


def is_logging_step(trainer: L.Trainer, every_n_steps: int | None) -> bool:
    """Whether the optimizer step that just finished is a logging step.

    Called from `on_train_batch_end`, where `global_step` already counts this step; with
    `every_n_steps=None` this matches the steps Lightning logs scalars on
    (`trainer.log_every_n_steps`).
    """
    every = every_n_steps or trainer.log_every_n_steps or 1
    return trainer.global_step > 0 and trainer.global_step % every == 0


def tensorboard_writers(trainer: L.Trainer) -> list:
    """The SummaryWriters of the trainer's TensorBoard loggers (rank 0 only; empty elsewhere)."""
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_scalars(trainer: L.Trainer, scalars: dict[str, float], step: int) -> None:
    """Write scalars through every logger the trainer has (TensorBoard, CSV, ...), rank 0 only."""
    if not scalars or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=step)


def indexed_moe_layers(module: nn.Module) -> list[tuple[int, MoELayer]]:
    """(tag index, layer) for every MoE layer: the layer's own `layer_index` (its block
    number) where set, else its position among the model's MoE layers."""
    return [
        (layer.layer_index if layer.layer_index is not None else position, layer)
        for position, layer in enumerate(moe_layers(module))
    ]


def sum_over_ranks(tensor: Tensor, trainer: L.Trainer) -> Tensor:
    """`tensor` summed over every rank of the run (one all-reduce; a no-op in one process).
    A collective: every rank must call it at the same point."""
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@dataclass
class LayerStatistics:
    """One MoE layer's routing on a training step, over the tokens of every rank."""

    tokens_per_expert_E: Tensor  # processed rows per expert (float64, CPU)
    router_prob_share_E: Tensor  # mean over tokens of the normalised router probabilities
    scalars: dict[str, float]  # moelab.callbacks.tags.UTILISATION_SCALARS
    aux_losses: dict[str, float]  # the layer's unweighted auxiliary losses, mean over ranks
    finite: bool  # every rank's router probabilities were finite


def step_statistics(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[int, LayerStatistics]:
    """Per MoE layer (by tag index), this training step's routing statistics over the
    tokens of all ranks, from one all-reduce of every layer's sums; cached for the step, so
    the callbacks that log on a step share it. A collective: call it on every rank."""
    cached = getattr(pl_module, "_moelab_step_statistics", None)
    if cached is not None and cached[0] == trainer.global_step:
        return cached[1]
    from moelab.moe.losses import z_loss

    layers, parts = [], []
    for index, layer in indexed_moe_layers(pl_module):
        plan = layer.last_plan
        if plan is None:
            continue
        stats = plan.stats()
        counts_E = stats["tokens_per_expert"].detach().double()
        probs_TE = plan.router_probs_TE.detach().double()
        finite = torch.isfinite(probs_TE).all()
        probs_TE = probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        tokens = float(probs_TE.shape[0])
        has_z = hasattr(plan, "router_logits_TE")
        z = z_loss(plan).detach().double() if has_z else counts_E.new_zeros(())
        names = sorted(layer.aux_losses)
        sums = torch.stack([counts_E.new_tensor(tokens), stats["dropped_fraction"].double() * tokens,
                            stats["unrouted_fraction"].double() * tokens, stats["router_entropy"].double() * tokens,
                            z * tokens, (~finite).double(), *(layer.aux_losses[n].detach().double() for n in names)])
        layers.append((index, len(counts_E), has_z, names))
        parts += [counts_E, probs_TE.sum(0), sums]
    if not parts:
        return {}
    flat = sum_over_ranks(torch.cat([p.to(parts[0].device) for p in parts]), trainer).cpu()
    world = max(1, trainer.world_size)
    result, at = {}, 0
    for index, num_experts, has_z, names in layers:
        counts_E, prob_sum_E = flat[at : at + num_experts], flat[at + num_experts : at + 2 * num_experts]
        at += 2 * num_experts
        tokens, dropped, unrouted, entropy, z, nonfinite, *aux = flat[at : at + 6 + len(names)].tolist()
        at += 6 + len(names)
        mean = counts_E.mean().clamp_min(1e-12)
        scalars = {
            "load_max_over_mean": float(counts_E.max() / mean),
            "load_min_over_mean": float(counts_E.min() / mean),
            "load_cv": float(counts_E.std(unbiased=False) / mean),
            "dropped_fraction": dropped / tokens,
            "unrouted_fraction": unrouted / tokens,
            "router_entropy": entropy / tokens,
        }
        if has_z:
            scalars["router_z"] = z / tokens
        result[index] = LayerStatistics(counts_E, prob_sum_E / tokens, scalars,
                                        {n: v / world for n, v in zip(names, aux)}, nonfinite == 0)
    pl_module._moelab_step_statistics = (trainer.global_step, result)
    return result
