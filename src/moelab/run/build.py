"""A run's objects from its composed config: data, model, task, callbacks, loggers and trainer,
and the checks across groups that no single component can make (before anything is built)."""

from __future__ import annotations

from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from moelab.callbacks.progress import progress_callbacks
from moelab.models.build import build_model
from moelab.moe.errors import ConfigError, check_num_experts
from moelab.run import resolvers  # noqa: F401 - the ${moelab.*:} resolvers the configs it builds use
from moelab.run.settings import check_setting_types


def instantiate_all(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a dict-of-configs group (callbacks, logger)."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Instantiate data, model, task and trainer; config mistakes surface as ConfigError."""
    # `_convert_="all"`: plain lists and dicts reach the code (and checkpoints' hparams,
    # which Lightning reloads with weights_only=True), never OmegaConf containers.
    datamodule = instantiate(cfg.data, _convert_="all")
    task = instantiate(cfg.task, model=build_model(cfg), _convert_="all")
    callbacks, bar = progress_callbacks(instantiate_all(cfg.get("callbacks")))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_all(cfg.get("logger")) or False,
                          enable_progress_bar=bar)
    return datamodule, task, trainer


def _int_setting(cfg: DictConfig, key: str, minimum: int | None = None) -> None:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be a whole number")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}")


def check_config(cfg: DictConfig) -> None:
    """Top-level keys, every group's settings against their types, and cross-group mistakes
    no single component can see: all before anything is built."""
    _int_setting(cfg, "seed")
    check_num_experts(cfg.get("experts"))
    _int_setting(cfg, "ep", minimum=1)
    check_setting_types(cfg)
    trainer = cfg.trainer
    for key in ("max_steps", "max_epochs"):
        if trainer.get(key) == 0:
            raise ConfigError(f"trainer.{key}=0 trains nothing: give it a number of {key[4:]} (or -1 for no limit)")
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    sharded = target.endswith("FSDPExpertParallelStrategy")
    if cfg.ep != 1 and not sharded:
        raise ConfigError(f"ep={cfg.ep} needs an expert-parallel trainer: add trainer=fsdp_ep")
    if cfg.model.get("upcycle") and not cfg.get("init_from"):
        raise ConfigError("model.upcycle=true builds the experts from a dense checkpoint: add "
                          "init_from=<a checkpoint of this model trained with model.moe_every=0>")
    if sharded and cfg.trainer.get("gradient_clip_algorithm") == "value":
        raise ConfigError("trainer=fsdp/fsdp_ep clip gradients by norm only: set trainer.gradient_clip_algorithm=norm")
    check_devices(cfg.trainer.get("accelerator"), cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1))


def check_devices(accelerator: object, devices: object, num_nodes: object = 1,
                  gpus_here: int | None = None) -> None:
    """A GPU trainer asking for more GPUs than this machine has (trainer=gpu/ddp8 on a
    CPU-only or smaller machine) is one line naming the fix, not Lightning's "No supported
    gpu backend found!". Multi-node runs are left to the cluster (each node checks itself)."""
    if str(accelerator) not in ("gpu", "cuda") or num_nodes not in (1, None):
        return
    import torch

    available = torch.cuda.device_count() if gpus_here is None else gpus_here
    wanted = devices if isinstance(devices, int) and not isinstance(devices, bool) else None
    if isinstance(devices, (list, tuple)) or (isinstance(devices, str) and devices not in ("auto", "-1")):
        return  # explicit device ids: Lightning names a missing one itself
    if available == 0:
        processes = wanted if wanted and wanted > 1 else None
        fix = (f"trainer.accelerator=cpu trainer.devices={processes} trainer.precision=32-true ({processes} CPU "
               "processes, the same strategy, fp32: bf16 matmuls are slow on most CPUs)" if processes else "trainer=cpu")
        raise ConfigError(f"trainer.accelerator={accelerator}, but this machine has no GPU: run on the CPU with {fix}")
    if wanted is not None and wanted > available:
        raise ConfigError(f"trainer.devices={wanted} asks for {wanted} GPUs, but this machine has {available}: set "
                          f"trainer.devices={available}")
