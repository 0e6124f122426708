"""Progress: Lightning's Rich bar on a terminal, showing the training metrics of the last
logging step without reading the device on the steps between; plain lines in the log (and,
without a terminal, on the console) from `ProgressLog`."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import (
    ProgressBar as ProgressBarBase,
)

log = logging.getLogger("moelab.progress")

# The training metrics the bar shows, where the task logs them.
SHOWN = ("train/loss", "train/ce", "train/acc")


class ProgressBar(RichProgressBar):
    """Lightning's RichProgressBar, with the training loss (and ce, acc) of the last step the
    task logged. Training metrics reach Lightning only when a log is due
    (`MoETask.log_step`); turning them into numbers reads them back from the device, so the
    bar does that once per logging step and shows those numbers until the next one. The
    evaluation metrics (`val/*`, logged once per epoch) come through Lightning as usual."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave, **kwargs)
        self._train_metrics: dict[str, float] = {}
        self._read_step: int | None = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's version: a multirun job's overrides, cut to fit
        logged_at = getattr(pl_module, "metrics_logged_at", None)
        if logged_at is not None and logged_at != self._read_step:
            self._read_step = logged_at
            metrics = trainer.callback_metrics
            self._train_metrics = {name: float(metrics[name]) for name in SHOWN
                                   if isinstance(metrics.get(name), (torch.Tensor, float, int))}
        return {**items, **self._train_metrics}


class ProgressLog(L.Callback):
    """One plain line per logging step, and one per validation, through Python's logging:
    on the console and in the run's `train.log`, so a run under nohup, SLURM or CI (no
    terminal, where a progress bar shows nothing) says how it goes, as nanoGPT and timm do:

        moelab: step 40/600 (epoch 1) | train/loss 1.2345 | lr 2.95e-03 | 41.2 ms/step | 6,120 images/s | MFU 11.8%
        moelab: validation after step 40 (epoch 1) | val/loss 0.3412 | val/acc 0.9074

    The values are the task's logged ones (read once per logging step, as the bar does) and
    its throughput reading (MFU where the device's peak is known); ms/step is the wall time
    per optimizer step since the previous line. With `file_only` (beside the Rich bar on a
    terminal) the lines go to train.log only."""

    def __init__(self, file_only: bool = False) -> None:
        self.file_only = file_only
        self._printed_step: int | None = None
        self._clock: tuple[float, int] | None = None

    def _say(self, trainer: L.Trainer, line: str) -> None:
        if trainer.is_global_zero:
            log.info(line, extra={FILE_ONLY: self.file_only})

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._clock = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = getattr(pl_module, "metrics_logged_at", None)
        if step is None or step != trainer.global_step - 1 or step == self._printed_step:
            return  # not a logging step (or its micro-batches after the first print)
        self._printed_step = step
        now = time.perf_counter()
        parts = [f"step {trainer.global_step}" + (f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0
                                                  else f"/{trainer.estimated_stepping_batches}"
                                                  if _finite(trainer.estimated_stepping_batches) else "")
                 + f" (epoch {trainer.current_epoch})"]
        metrics = trainer.callback_metrics
        parts += [f"{name} {float(metrics[name]):.4f}" for name in SHOWN if isinstance(metrics.get(name), (torch.Tensor, float))]
        if trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            parts.append(f"lr {float(lr):.2e}")
        if self._clock is not None and trainer.global_step > self._clock[1]:
            parts.append(f"{1000 * (now - self._clock[0]) / (trainer.global_step - self._clock[1]):.1f} ms/step")
        self._clock = (now, trainer.global_step)
        reading = getattr(getattr(pl_module, "throughput", None), "latest", {}) or {}
        for name, value in reading.items():
            if name == "train/mfu":
                parts.append(f"MFU {100 * value:.1f}%")
            else:
                parts.append(f"{value:,.0f} {name.removeprefix('train/').replace('_per_s', '/s')}")
        self._say(trainer, "moelab: " + " | ".join(parts))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        shown = [f"{name} {float(value):.4f}" for name, value in sorted(metrics.items())
                 if name.startswith("val/") and "/aux" not in name and getattr(value, "numel", lambda: 1)() == 1]
        self._say(trainer, f"moelab: validation after step {trainer.global_step} (epoch {trainer.current_epoch}) | "
                  + (" | ".join(shown) or "no metrics"))
        self._clock = (time.perf_counter(), trainer.global_step)  # validation time is not step time


def _finite(value: object) -> bool:
    return isinstance(value, int) and 0 < value < 1 << 40


# A log record's attribute: keep it out of the console (a progress bar is there).
FILE_ONLY = "moelab_file_only"


class _NotOnConsole(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, FILE_ONLY, False)


class PlainModelSummary(ModelSummary):
    """Lightning's model summary without its FLOPs column and total, which read 0 unless the
    model declares an example input (moelab's FLOPs are in the throughput lines and
    moelab.models.flops)."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs: Any) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import (
            _format_summary_table,
        )

        data = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *data)
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info(
            "\n" + "\n".join(line for line in table.splitlines() if "Total FLOPs" not in line))


def progress_callbacks(callbacks: list[L.Callback], terminal: bool | None = None) -> tuple[list[L.Callback], bool]:
    """The run's callbacks with its progress reporting settled, and whether Lightning shows a
    bar: on a terminal the configured bar (plus the plain lines in train.log only); without one
    (nohup, SLURM, CI, a pipe) or with `callbacks.progress=null`, no bar and the plain lines on
    the console and in train.log."""
    terminal = sys.stdout.isatty() if terminal is None else terminal
    if not any(isinstance(c, ModelSummary) for c in callbacks):
        callbacks = [*callbacks, PlainModelSummary(max_depth=1)]
    bars = [c for c in callbacks if isinstance(c, ProgressBarBase)]
    rest = [c for c in callbacks if not isinstance(c, ProgressBarBase)]
    if bars and terminal:
        for handler in logging.getLogger().handlers:
            if not isinstance(handler, logging.FileHandler) and not any(isinstance(f, _NotOnConsole) for f in handler.filters):
                handler.addFilter(_NotOnConsole())
        return [*rest, *bars, ProgressLog(file_only=True)], True
    return [*rest, ProgressLog()], False
