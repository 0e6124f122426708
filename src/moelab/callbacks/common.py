"""Helpers the expert callbacks share: when to record, where to write, how to name a layer."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

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
