"""Expert utilisation in TensorBoard: per MoE layer on logging steps, and a layer × expert
load heatmap at each validation."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from moelab.callbacks.common import (
    AlsoOnTest,
    check_every_n,
    indexed_moe_layers,
    is_logging_step,
    layer_order,
    log_scalars,
    plan_sums,
    statistics_of_sums,
    step_statistics,
    sum_over_ranks,
)
from moelab.callbacks.heatmap import render_heatmap
from moelab.callbacks.tags import (
    LOAD_HEATMAP_TAG,
    aux_loss_tag,
    layer_scalar_tag,
    router_prob_share_tag,
    tokens_per_expert_tag,
)
from moelab.callbacks.writers import view_writers
from moelab.moe.routing import Routing


def utilisation_scalars(plan: Routing) -> dict[str, float]:
    """Load imbalance, drops, entropy and router z of one plan (names:
    `tags.UTILISATION_SCALARS`; definitions: `common.statistics_of_sums`)."""
    return statistics_of_sums(plan_sums(plan), hasattr(plan, "router_logits_TE"))[2]


def router_prob_share_E(plan: Routing) -> Tensor:
    """Mean router probability per expert over one plan's tokens, normalised to sum to 1."""
    return statistics_of_sums(plan_sums(plan), False)[1]


def write_expert_histogram(writer, tag: str, values_E: Tensor, step: int) -> None:
    """A histogram with one bucket per expert (bucket e spans (e-0.5, e+0.5]) holding values_E[e]."""
    if not hasattr(writer, "add_histogram_raw"):
        return  # a logger without histograms (MLflow): said once by view_writers
    values_E = values_E.detach().double().cpu()
    experts_E = torch.arange(len(values_E), dtype=torch.float64)
    writer.add_histogram_raw(
        tag,
        min=0.0,
        max=float(len(values_E) - 1),
        num=float(values_E.sum()),
        sum=float((values_E * experts_E).sum()),
        sum_squares=float((values_E * experts_E.square()).sum()),
        bucket_limits=(experts_E + 0.5).tolist(),
        bucket_counts=values_E.tolist(),
        global_step=step,
    )


class ExpertUtilisation(AlsoOnTest, L.Callback):
    """Per MoE layer i, from the last training batch's routing plan, on logging steps:

    - `moe/layer<i>/tokens_per_expert`: histogram, one bucket per expert, height = tokens
      the expert processed (kept assignments: tokens × k when dropless);
    - `moe/layer<i>/router_prob_share`: histogram, mean router probability per expert;
    - scalars `moe/layer<i>/{load_max_over_mean, load_min_over_mean, load_cv,
      dropped_fraction, unrouted_fraction, router_entropy, router_z}` and
      `moe/layer<i>/aux/<name>` for each auxiliary loss the layer computes.

    At the end of each validation: `moe/load_heatmap`, an image of layer × expert load over
    the whole validation set, as a multiple of the mean load (1 = perfectly balanced).

    Every statistic covers the tokens of all ranks: on a logging step every rank sums its
    layers' counts into one all-reduce (none on other steps), and rank 0 writes.
    `every_n_steps=None` follows `trainer.log_every_n_steps`.
    """

    def __init__(self, every_n_steps: int | None = None, load_heatmap: bool = True) -> None:
        self.every_n_steps = check_every_n("callbacks.expert_utilisation.every_n_steps", every_n_steps)
        self.load_heatmap = load_heatmap
        self._last_logged_step = -1
        self._val_counts: dict[int, Tensor] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_logged_step or not is_logging_step(trainer, self.every_n_steps):
            return
        self._last_logged_step = step  # with gradient accumulation several batches share a step
        statistics = step_statistics(trainer, pl_module)  # every rank: one all-reduce
        if not trainer.is_global_zero:
            return
        writers = view_writers(trainer)
        scalars: dict[str, float] = {}
        for index, layer in statistics.items():
            scalars.update({layer_scalar_tag(index, name): value for name, value in layer.scalars.items()})
            scalars.update({aux_loss_tag(index, name): value for name, value in layer.aux_losses.items()})
            for writer in writers:
                write_expert_histogram(writer, tokens_per_expert_tag(index), layer.tokens_per_expert_E, step)
                write_expert_histogram(writer, router_prob_share_tag(index), layer.router_prob_share_E, step)
        log_scalars(trainer, scalars, step)

    # Validation: accumulate tokens per expert over the epoch on every rank, sum over the
    # ranks once at its end, render on rank 0.
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_counts = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.load_heatmap or trainer.sanity_checking:
            return
        for index, layer in indexed_moe_layers(pl_module):
            if layer.last_plan is None:
                continue
            counts_E = layer.last_plan.tokens_per_expert_E.detach().double()
            previous = self._val_counts.get(index)
            self._val_counts[index] = counts_E if previous is None else previous + counts_E

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.load_heatmap or trainer.sanity_checking:
            return
        indices = sorted(self._val_counts, key=layer_order)
        if indices:
            flat = sum_over_ranks(torch.cat([self._val_counts[i] for i in indices]), trainer).cpu()
            sizes = [len(self._val_counts[i]) for i in indices]
            self._val_counts = dict(zip(indices, flat.split(sizes)))
        writers = view_writers(trainer)
        if writers and self._val_counts:
            image = load_heatmap_image(self._val_counts)
            for writer in writers:
                writer.add_image(LOAD_HEATMAP_TAG, image, trainer.global_step)
        self._val_counts = {}


def load_heatmap_image(counts_by_layer: dict[int, Tensor]):
    """Layer × expert image of tokens per expert ÷ the layer's mean (layers may differ in E:
    shorter rows are padded with 0)."""
    indices = sorted(counts_by_layer, key=layer_order)
    num_experts = max(len(counts_by_layer[i]) for i in indices)
    load_LE = torch.zeros(len(indices), num_experts, dtype=torch.float64)
    for row, index in enumerate(indices):
        counts_E = counts_by_layer[index].cpu()
        load_LE[row, : len(counts_E)] = counts_E / counts_E.mean().clamp_min(1e-12)
    return render_heatmap(
        load_LE,
        title="expert load over the validation set (1 = balanced)",
        xlabel="expert",
        ylabel="MoE layer",
        colorbar_label="tokens ÷ mean tokens per expert",
        row_labels=[str(i) for i in indices],
        col_labels=[str(e) for e in range(num_experts)],
    )
