"""The progress bar: Lightning's Rich bar, showing the training metrics of the last logging
step without reading the device on the steps between."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

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
        logged_at = getattr(pl_module, "metrics_logged_at", None)
        if logged_at is not None and logged_at != self._read_step:
            self._read_step = logged_at
            metrics = trainer.callback_metrics
            self._train_metrics = {name: float(metrics[name]) for name in SHOWN
                                   if isinstance(metrics.get(name), (torch.Tensor, float, int))}
        return {**items, **self._train_metrics}
