"""Where the expert views go: every logger of the run that takes images (TensorBoard, W&B,
MLflow), through one small interface — TensorBoard's SummaryWriter methods `add_image`
(CHW uint8), `add_text` and `add_histogram_raw` — so the callbacks write each view once per
logger. A logger that cannot take a kind of view (CSV: none; MLflow: histograms) is named in
one warning, once per run."""

from __future__ import annotations

import lightning as L
import numpy as np
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn


class WandbViews:
    """The views as W&B media: images, text tables and histograms on the trainer's step axis."""

    def __init__(self, logger: WandbLogger) -> None:
        self.logger = logger

    def add_image(self, tag: str, image_CHW: np.ndarray, step: int) -> None:
        self.logger.log_image(key=tag, images=[np.asarray(image_CHW).transpose(1, 2, 0)], step=step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.logger.log_text(key=tag, columns=["text"], data=[[text]], step=step)

    def add_histogram_raw(self, tag: str, bucket_limits: list[float], bucket_counts: list[float], global_step: int,
                          **_: object) -> None:
        import wandb

        edges = [bucket_limits[0] - 1.0, *bucket_limits]
        self.logger.experiment.log({tag: wandb.Histogram(np_histogram=(bucket_counts, edges)),
                                    "trainer/global_step": global_step})


class MLflowViews:
    """The views as MLflow run artifacts: images by key and step, text files; no histograms."""

    def __init__(self, logger: MLFlowLogger) -> None:
        self.logger = logger

    def add_image(self, tag: str, image_CHW: np.ndarray, step: int) -> None:
        self.logger.experiment.log_image(self.logger.run_id, np.asarray(image_CHW).transpose(1, 2, 0), key=tag, step=step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.logger.experiment.log_text(self.logger.run_id, text, f"{tag}/step_{step:07d}.txt")


_warned: set[str] = set()


def view_writers(trainer: L.Trainer) -> list:
    """A writer per logger of the trainer that takes the expert views (rank 0 only; empty
    elsewhere): TensorBoard's SummaryWriter, W&B and MLflow adapters."""
    if not trainer.is_global_zero:
        return []
    writers = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            writers.append(logger.experiment)
        elif isinstance(logger, WandbLogger):
            writers.append(WandbViews(logger))
        elif isinstance(logger, MLFlowLogger):
            writers.append(MLflowViews(logger))
            _warn_once("mlflow", "moelab: MLflow takes no histograms: the tokens-per-expert and router-probability "
                                 "histograms go to the other loggers only (its scalars, images and text are logged)")
        else:  # CSV and others: scalars only
            _warn_once(type(logger).__name__, f"moelab: {type(logger).__name__} takes no images: the expert views "
                                              "(heatmaps, histograms, tables) go to the other loggers only")
    return writers


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        rank_zero_warn(message)


class TensorBoard(TensorBoardLogger):
    """Lightning's TensorBoard logger with Lightning's `epoch` scalar as `trainer/epoch`, so the
    time-series page, sorted by tag, opens on the expert views (`moe/`) and the losses
    (`train/`, `val/`, `test/`) and not on the epoch count."""

    def log_metrics(self, metrics, step=None) -> None:
        if "epoch" in metrics:
            metrics = {("trainer/epoch" if name == "epoch" else name): value for name, value in metrics.items()}
        super().log_metrics(metrics, step)
