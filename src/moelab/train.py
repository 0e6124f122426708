"""run(cfg): build data, model, task, callbacks, loggers and trainer from a Hydra config, fit, test,
write metrics.json, and return the metric a sweep optimises."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from moelab.moe.errors import ConfigError
from moelab.sweep import run_version  # noqa: F401 - registers ${moelab.run_version:} for the logger config

log = logging.getLogger(__name__)

# Lightning gives its logger a console handler of its own; under Hydra the root logger
# already prints (and writes the run's log file), so drop Lightning's to avoid every
# line appearing twice.
if logging.getLogger().hasHandlers():
    logging.getLogger("lightning").handlers.clear()

# Errors that mean "the configuration is wrong": reported in one line, never as a traceback.
USER_ERRORS = (ConfigError, MisconfigurationException, FileNotFoundError)


def _user_error(exc: BaseException) -> BaseException | None:
    """The first configuration error in an exception's cause chain (Hydra wraps them)."""
    while exc is not None:
        if isinstance(exc, USER_ERRORS):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _instantiate_all(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a dict-of-configs group (callbacks, logger)."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Instantiate data, model, task and trainer; config mistakes surface as ConfigError."""
    # `_convert_="all"`: plain lists and dicts reach the code (and checkpoints' hparams,
    # which Lightning reloads with weights_only=True), never OmegaConf containers.
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(
        cfg.model,
        router=cfg.router,
        expert=cfg.expert,
        aux_loss_weights=OmegaConf.to_container(cfg.loss, resolve=True) if cfg.loss else {},
        _convert_="all",
    )
    task = instantiate(cfg.task, model=model, _convert_="all")
    trainer = instantiate(cfg.trainer, callbacks=_instantiate_all(cfg.get("callbacks")), logger=_instantiate_all(cfg.get("logger")) or False)
    return datamodule, task, trainer


@rank_zero_only
def write_metrics(metrics: dict[str, float], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def run(cfg: DictConfig) -> float | None:
    """Train (and test) as configured. Returns `metrics[cfg.optimized_metric]` for sweeps."""
    try:
        return _run(cfg)
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a user error
        user_error = _user_error(exc)
        if user_error is None:
            raise
        raise SystemExit(f"moelab: error: {user_error}") from None


def _run(cfg: DictConfig) -> float | None:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, task, trainer = build(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        log.info("Run folder: %s", output_dir)

    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = _floats(trainer.callback_metrics)
    if cfg.get("test"):
        results = trainer.test(task, datamodule=datamodule, verbose=False)
        for result in results:
            metrics.update(_floats(result))
    write_metrics(metrics, output_dir / "metrics.json")

    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        raise ConfigError(f"optimized_metric '{name}' was not logged; logged: {', '.join(sorted(metrics))}")
    return metrics.get(name) if name else None
