"""Dead-expert / collapse alarm: warn (and optionally stop) when experts stop getting tokens."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from moelab.callbacks.common import (
    check_every_n,
    is_logging_step,
    log_scalars,
    step_statistics,
)
from moelab.callbacks.tags import DEAD_EXPERTS, layer_scalar_tag
from moelab.moe.errors import ConfigError

log = logging.getLogger(__name__)


class ExpertCollapseAlarm(L.Callback):
    """An expert is dead when it gets under `min_fair_share` of its fair share of a layer's
    routed tokens (fair share = 1/E of them) on `patience` logging steps in a row, counted
    from the end of the learning-rate warm-up (`task.warmup_steps`: routing moves fastest
    there, and an expert starved for a few steps then is no collapse).

    On every logging step: `moe/layer<i>/dead_experts` (how many are dead now). When an
    expert first becomes dead: a warning naming the layer and experts. With
    `stop_on_collapse`, the first dead expert stops training (after the current step; the
    test stage still runs). Counts are the tokens of all ranks (the same all-reduce the
    utilisation view uses on that step), so every rank reaches the same decision.
    """

    def __init__(
        self,
        min_fair_share: float = 0.1,
        patience: int = 5,
        every_n_steps: int | None = None,
        stop_on_collapse: bool = False,
    ) -> None:
        if not 0.0 < min_fair_share <= 1.0:
            raise ConfigError(f"callbacks.collapse_alarm.min_fair_share={min_fair_share} must be in (0, 1]")
        if patience < 1:
            raise ConfigError(f"callbacks.collapse_alarm.patience={patience} must be >= 1")
        self.min_fair_share = min_fair_share
        self.patience = patience
        self.every_n_steps = check_every_n("callbacks.collapse_alarm.every_n_steps", every_n_steps)
        self.stop_on_collapse = stop_on_collapse
        self._streak: dict[int, torch.Tensor] = {}  # layer -> consecutive low logging steps per expert
        self._warned: dict[int, torch.Tensor] = {}
        self._last_step = -1
        self.dead_experts: dict[int, list[int]] = {}  # layer -> dead experts at the last logging step
        self.stopped = False

    def state_dict(self) -> dict:
        """The streak counters, so a resumed run warns (and stops) at the same step."""
        return {
            "streak": {index: streak.tolist() for index, streak in self._streak.items()},
            "warned": {index: warned.tolist() for index, warned in self._warned.items()},
            "stopped": self.stopped,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._streak = {int(i): torch.tensor(v, dtype=torch.long) for i, v in state_dict.get("streak", {}).items()}
        self._warned = {int(i): torch.tensor(v, dtype=torch.bool) for i, v in state_dict.get("warned", {}).items()}
        self.stopped = bool(state_dict.get("stopped", False))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or not is_logging_step(trainer, self.every_n_steps):
            return
        self._last_step = step
        if step < int((getattr(pl_module, "hparams", None) or {}).get("warmup_steps", 0) or 0):
            return  # the same decision on every rank: no collective is skipped on one only
        scalars: dict[str, float] = {}
        newly_dead: list[str] = []
        for index, layer in step_statistics(trainer, pl_module).items():  # all ranks' tokens
            if not layer.finite:
                continue  # a non-finite step routes garbage: not evidence of a dead expert
            counts_E = layer.tokens_per_expert_E
            share_E = counts_E / counts_E.sum().clamp_min(1e-12)
            low_E = share_E < self.min_fair_share / len(counts_E)
            streak_E = self._streak.get(index, torch.zeros(len(counts_E), dtype=torch.long))
            streak_E = (streak_E + 1) * low_E
            self._streak[index] = streak_E
            dead_E = streak_E >= self.patience
            warned_E = self._warned.get(index, torch.zeros_like(dead_E))
            fresh_E = dead_E & ~warned_E
            self._warned[index] = warned_E | dead_E
            self.dead_experts[index] = dead_E.nonzero().flatten().tolist()
            scalars[layer_scalar_tag(index, DEAD_EXPERTS)] = float(dead_E.sum())
            if fresh_E.any():
                newly_dead.append(f"layer {index} experts {fresh_E.nonzero().flatten().tolist()}")
        log_scalars(trainer, scalars, step)
        if newly_dead:
            rank_zero_warn(
                f"dead experts at step {step}: {'; '.join(newly_dead)} got under "
                f"{self.min_fair_share:.0%} of their fair share of tokens on {self.patience} logging steps "
                f"in a row; {_advice(pl_module)}"
            )
        if self.stop_on_collapse:
            # A collective: every rank calls it on the same (logging) steps.
            collapsed = trainer.strategy.reduce_boolean_decision(any(self.dead_experts.values()), all=False)
            if collapsed and not self.stopped:
                self.stopped = True
                trainer.should_stop = True
                message = (
                    f"moelab: stopping at step {step}: expert collapse (dead experts by layer: "
                    f"{ {i: d for i, d in self.dead_experts.items() if d} }); "
                    "callbacks.collapse_alarm.stop_on_collapse=false keeps training"
                )
                if trainer.is_global_zero:
                    log.error(message)
                rank_zero_warn(message)


def _advice(pl_module: L.LightningModule) -> str:
    """What to try, given the run's balance loss: add one, or raise the one it has."""
    from moelab.moe.routed import moe_layers

    weights = [getattr(layer, "aux_loss_weights", {}) or {} for layer in moe_layers(pl_module)]
    balance = max((w.get("balance", 0.0) for w in weights), default=0.0)
    if balance > 0:
        return (f"consider a stronger balance loss (loss.balance={balance:g} now, e.g. {10 * balance:g}), "
                "a router z-loss, or a lower learning rate")
    return "consider a balance loss (loss=balance_zloss), a router z-loss, or a lower learning rate"
