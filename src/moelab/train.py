"""run(cfg): build data, model, task, callbacks, loggers and trainer from a Hydra config, fit, test,
write metrics.json, and return the metric a sweep optimises."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

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


def check_config(cfg: DictConfig) -> None:
    """Cross-group mistakes no single component can see."""
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    if cfg.get("ep", 1) != 1 and not target.endswith("FSDPExpertParallelStrategy"):
        raise ConfigError(f"ep={cfg.ep} needs an expert-parallel trainer: add trainer=fsdp_ep")


def relaunch_as_single_run() -> None:
    """Make Lightning's per-rank relaunch of this script work inside a Hydra multirun.

    Lightning starts ranks 1..N-1 by re-running `sys.argv` with `hydra.run.dir` set to
    this job's run dir. In a multirun, argv holds the whole sweep (and `-m`) and run.dir
    is not the job's folder, so every rank would start a sweep of its own (hydra#2070,
    Lightning#11300). Rewrite both so the relaunch is a single run of this job's
    overrides in this job's folder.
    """
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


# What Lightning's launcher writes into this process's environment when it starts ranks.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def restored_launcher_env():
    """Undo the launcher's environment after a job: with LOCAL_RANK left behind, the next
    job of a multirun would believe its ranks were started externally and wait forever."""
    saved = {key: os.environ.get(key) for key in LAUNCHER_ENV}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run(cfg: DictConfig) -> float | None:
    check_config(cfg)
    relaunch_as_single_run()
    with restored_launcher_env():
        return _fit_and_test(cfg)


def _fit_and_test(cfg: DictConfig) -> float | None:
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
    if dist.is_available() and dist.is_initialized():
        # The next job of a multirun starts its own process group.
        dist.destroy_process_group()

    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        raise ConfigError(f"optimized_metric '{name}' was not logged; logged: {', '.join(sorted(metrics))}")
    return metrics.get(name) if name else None
