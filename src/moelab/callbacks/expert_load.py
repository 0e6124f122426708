"""Tokens-per-expert histograms per MoE layer in TensorBoard, every N training steps."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from moelab.moe.layer import moe_layers


def tokens_per_expert_tag(layer_index: int) -> str:
    return f"moe/layer{layer_index}/tokens_per_expert"


class ExpertLoadHistogram(L.Callback):
    """Writes `moe/layer<i>/tokens_per_expert`: a histogram with one bucket per expert
    whose height is the tokens that expert processed in the logged step (kept
    assignments, so with capacity drops the total is below tokens × k)."""

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.expert_load.every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if (step - 1) % self.every_n_steps:  # global_step is already advanced here
            return
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers:
            return
        for position, layer in enumerate(moe_layers(pl_module)):
            if layer.last_plan is None:
                continue
            counts = layer.last_plan.tokens_per_expert_E.detach().double().cpu()
            experts = counts.new_tensor(range(len(counts)))
            tag = tokens_per_expert_tag(layer.layer_index if layer.layer_index is not None else position)
            for writer in writers:
                writer.add_histogram_raw(
                    tag,
                    min=0.0,
                    max=float(len(counts) - 1),
                    num=float(counts.sum()),
                    sum=float((counts * experts).sum()),
                    sum_squares=float((counts * experts.square()).sum()),
                    bucket_limits=(experts + 0.5).tolist(),
                    bucket_counts=counts.tolist(),
                    global_step=step,
                )
