"""Callbacks that stop a run the ways real runs stop, for the resume tests: a signal sent to
the process itself, or an exception from inside a step. Added with
`+callbacks.stop._target_=tests.stops.<Name>`; and one that makes a router diverge."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch


class SignalAt(L.Callback):
    """Send `signum` to this process (rank `rank` only) during training step `step`: after
    its forward pass, as a Ctrl+C or `kill` arriving mid-step would."""

    def __init__(self, step: int, signum: str = "SIGINT", rank: int = 0) -> None:
        self.step, self.signum, self.rank = step, getattr(signal, signum), rank

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


class Crash(RuntimeError):
    pass


class RaiseAt(L.Callback):
    """Raise `Crash` in training step `step`, before its optimizer step ("backward") or after
    it ("batch_end")."""

    def __init__(self, step: int, where: str = "backward") -> None:
        self.step, self.where = step, where

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.where == "backward" and trainer.global_step == self.step:
            raise Crash(f"injected failure in step {self.step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.where == "batch_end" and trainer.global_step == self.step + 1:
            raise Crash(f"injected failure after step {self.step}")


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
