"""Helpers the expert callbacks share: when to record, where to write, how to name a layer."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from moelab.moe.errors import ConfigError
from moelab.moe.layer import MoELayer
from moelab.moe.routed import routed_layers


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


def indexed_moe_layers(module: nn.Module) -> list[tuple[int | str, MoELayer]]:
    """(tag index, layer) for every routed layer: the layer's own `layer_index` (its block
    number) where set, else its position among the model's routed layers; a mixture of
    attention heads adds its tag (`3/attn`: tags moe/layer3/attn/...)."""
    indexed = []
    for position, layer in enumerate(routed_layers(module)):
        index = layer.layer_index if layer.layer_index is not None else position
        tag = getattr(layer, "tag", None)
        indexed.append((f"{index}/{tag}" if tag else index, layer))
    return indexed


def layer_order(index: int | str) -> tuple[int, str]:
    """Sort key of tag indices: by block, a block's FFN (3) before its attention (3/attn)."""
    head, _, tail = str(index).partition("/")
    return (int(head) if head.isdigit() else 1 << 30, tail)


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


PLAN_SCALARS = 6  # tokens, dropped·T, unrouted·T, entropy·T, z·T, non-finite flag


def plan_sums(plan) -> Tensor:
    """One routing plan's statistics as sums that add up over ranks (float64, on the plan's
    device): tokens per expert (E), router probabilities summed over tokens (E), then the
    token count, dropped fraction · T, unrouted fraction · T, entropy · T, router z · T
    (0 for plans without router logits) and 1 if any probability is non-finite."""
    from moelab.moe.losses import z_loss

    stats = plan.stats()
    counts_E = stats["tokens_per_expert"].detach().double()
    probs_TE = plan.router_probs_TE.detach().double()
    nonfinite = (~torch.isfinite(probs_TE).all()).double()
    probs_TE = probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    tokens = float(probs_TE.shape[0])
    z = z_loss(plan).detach().double() if hasattr(plan, "router_logits_TE") else counts_E.new_zeros(())
    scalars = torch.stack([counts_E.new_tensor(tokens), stats["dropped_fraction"].double() * tokens,
                           stats["unrouted_fraction"].double() * tokens, stats["router_entropy"].double() * tokens,
                           z * tokens, nonfinite])
    return torch.cat([counts_E, probs_TE.sum(0), scalars])


def statistics_of_sums(sums: Tensor, has_z: bool) -> tuple[Tensor, Tensor, dict[str, float], bool]:
    """(tokens per expert, router probability share, the `tags.UTILISATION_SCALARS`, finite)
    from `plan_sums` (of one plan, or summed over ranks). load_*: over tokens per expert c
    (max/mean, min/mean, coefficient of variation with the population std); router_z: mean
    over tokens of (logsumexp h)², for plans with router logits (Soft MoE has slot logits)."""
    sums = sums.detach().double().cpu()
    num_experts = (len(sums) - PLAN_SCALARS) // 2
    counts_E, prob_sum_E = sums[:num_experts], sums[num_experts : 2 * num_experts]
    tokens, dropped, unrouted, entropy, z, nonfinite = sums[2 * num_experts :].tolist()
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
    return counts_E, prob_sum_E / tokens, scalars, nonfinite == 0


def step_statistics(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[int, LayerStatistics]:
    """Per MoE layer (by tag index), this training step's routing statistics over the
    tokens of all ranks, from one all-reduce of every layer's `plan_sums` and auxiliary
    losses; cached for the step, so the callbacks that log on a step share it. A
    collective: call it on every rank."""
    cached = getattr(pl_module, "_moelab_step_statistics", None)
    if cached is not None and cached[0] == trainer.global_step:
        return cached[1]
    layers, parts = [], []
    for index, layer in indexed_moe_layers(pl_module):
        plan = layer.last_plan
        if plan is None:
            continue
        names = sorted(layer.aux_losses)
        sums = plan_sums(plan)
        layers.append((index, len(sums), hasattr(plan, "router_logits_TE"), names))
        parts += [sums, *(layer.aux_losses[n].detach().double().reshape(1) for n in names)]
    if not parts:
        return {}
    flat = sum_over_ranks(torch.cat([p.to(parts[0].device) for p in parts]), trainer).cpu()
    world = max(1, trainer.world_size)
    result, at = {}, 0
    for index, size, has_z, names in layers:
        counts_E, share_E, scalars, finite = statistics_of_sums(flat[at : at + size], has_z)
        aux = flat[at + size : at + size + len(names)].tolist()
        at += size + len(names)
        result[index] = LayerStatistics(counts_E, share_E, scalars, {n: v / world for n, v in zip(names, aux)}, finite)
    pl_module._moelab_step_statistics = (trainer.global_step, result)
    return result


class AlsoOnTest:
    """For validation views: eval.py sets `on_test`, and the test loop's batches then feed
    the same views (`on_test_starts` adjusts what validation's start decided)."""

    on_test = False

    def on_test_starts(self) -> None:
        pass

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_test:
            self.on_validation_epoch_start(trainer, pl_module)
            self.on_test_starts()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.on_test:
            self.on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_test:
            self.on_validation_epoch_end(trainer, pl_module)
