"""Callbacks that stop a run the ways real runs stop, for the resume tests: a signal sent to
the process itself, or an exception from inside a step. Added with
`+callbacks.stop._target_=tests.stops.<Name>`; and one that makes a router diverge."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch


class SignalAt(L.Callback):
    """Send `signum` once, at optimizer step `step`, on rank `rank`: after a training forward
    pass (as a Ctrl+C or `kill` arriving mid-step would), during a validation
    (`during=validation`) or during the test (`during=test`). To this process, or with
    `group=true` to its whole process group, as a terminal's Ctrl+C does (loader workers
    included). `again=true`: a second time, before that step's optimizer step (Ctrl+C twice)."""

    def __init__(self, step: int, signum: str = "SIGINT", rank: int = 0, during: str = "training", group: bool = False,
                 again: bool = False) -> None:
        self.step, self.signum, self.rank, self.during, self.group = step, getattr(signal, signum), rank, during, group
        self.sent, self.again = False, again

    def _send(self, trainer: L.Trainer, during: str) -> None:
        if self.sent or during != self.during or trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        self.sent = True
        if self.group:
            os.killpg(os.getpgrp(), self.signum)
        else:
            os.kill(os.getpid(), self.signum)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss) -> None:
        self._send(trainer, "training")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._send(trainer, "validation")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._send(trainer, "test")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.again and self.sent and trainer.global_step == self.step:
            self.again = False
            os.kill(os.getpid(), self.signum)


class Crash(RuntimeError):
    pass


class RaiseAt(L.Callback):
    """Raise `Crash` in training step `step`: after its backward pass ("backward"; with
    gradient accumulation, in every micro-batch of the step), after its optimizer step
    ("batch_end"), or in a validation that follows it ("validation")."""

    def __init__(self, step: int, where: str = "backward") -> None:
        self.step, self.where = step, where

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.where == "backward" and trainer.global_step == self.step:
            raise Crash(f"injected failure in step {self.step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.where == "batch_end" and trainer.global_step == self.step + 1:
            raise Crash(f"injected failure after step {self.step}")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.where == "validation" and trainer.global_step == self.step:
            raise Crash(f"injected failure in the validation at step {self.step}")


class RaiseInMicroBatch(L.Callback):
    """Raise `Crash` after the backward pass of micro-batch `batch` of epoch `epoch`."""

    def __init__(self, batch: int, epoch: int) -> None:
        self.batch, self.epoch = batch, epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._here = batch_idx == self.batch and trainer.current_epoch == self.epoch

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._here:
            raise Crash(f"injected failure in micro-batch {self.batch} of epoch {self.epoch}")


class PoisonRouterAt(L.Callback):
    """Before training step `step`, set one gate weight of the router of MoE layer `layer` to
    inf: that router's logits are the first non-finite values of the forward pass."""

    def __init__(self, step: int, layer: int = 1) -> None:
        self.step, self.layer = step, layer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            from moelab.moe import moe_layers

            (layer,) = [m for m in moe_layers(pl_module) if m.layer_index == self.layer]
            with torch.no_grad():
                layer.router.gate.weight[0, 0] = float("inf")


class RecordWeights(L.Callback):
    """A copy of the model's parameters after every optimizer step: `after_steps[n]` holds them
    after n steps. The newest instance is `RecordWeights.last` (callbacks come from configs)."""

    last: "RecordWeights | None" = None

    def __init__(self) -> None:
        self.after_steps: dict[int, list[torch.Tensor]] = {}
        RecordWeights.last = self

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_steps[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]
