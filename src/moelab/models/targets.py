"""What a config read from a file may build. A checkpoint, or a run or sweep folder, may come
from a stranger, and Hydra's `instantiate` calls whatever `_target_` names (`pathlib.Path.touch`,
`subprocess.run`, ...): so every `_target_` of a stored config, at any depth (nested configs,
`_args_`, partial factories), must be one of the classes moelab's own config groups name,
checked before anything is instantiated. Extra names (your own router class, say) are
trusted through the environment: `MOELAB_TRUSTED_TARGETS=pkg.mod.Class,pkg.mod.Other`.
Composed configs of your own runs are yours and are not checked."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from moelab.moe.errors import ConfigError

TRUSTED_ENV = "MOELAB_TRUSTED_TARGETS"

_ROUTERS = ("AuxFreeRouter", "CosineRouter", "DenseRouter", "ExpertChoiceRouter", "GShardRouter", "HashRouter",
            "NoisyTopKRouter", "SinkhornRouter", "SmearRouter", "SoftMoERouter", "TopKRouter")
ALLOWED_TARGETS = frozenset({
    # the model and its parts (conf/model, conf/router, conf/expert)
    "moelab.models.vit.MoEViT", "moelab.models.lm.MoELM",
    "moelab.moe.experts.GroupedExperts", "moelab.moe.experts.LoRAExperts",
    *(f"moelab.moe.routers.{name}" for name in _ROUTERS),
    # data, task, callbacks, trainer, strategy, loggers (conf/data, task, callbacks, trainer, logger)
    "moelab.data.digits.DigitsDataModule", "moelab.data.images.CIFARDataModule",
    "moelab.data.images.ImageFolderDataModule", "moelab.data.text.HFTextDataModule",
    "moelab.data.text.PyStdlibDataModule", "moelab.data.text.TokenFileDataModule",
    "moelab.tasks.language.LanguageModeling", "moelab.tasks.vision.ImageClassification",
    "moelab.callbacks.checkpoint.LastCheckpoint", "moelab.callbacks.collapse.ExpertCollapseAlarm",
    "moelab.callbacks.progress.ProgressBar", "moelab.callbacks.specialisation.ExpertSpecialisation",
    "moelab.callbacks.utilisation.ExpertUtilisation", "moelab.parallel.strategy.FSDPExpertParallelStrategy",
    "lightning.pytorch.Trainer", "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning.pytorch.callbacks.ModelCheckpoint", "lightning.pytorch.callbacks.RichProgressBar",
    "lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger",
    "moelab.callbacks.writers.TensorBoard", "lightning.pytorch.loggers.WandbLogger",
    "lightning.pytorch.loggers.MLFlowLogger",
})


def trusted_targets() -> frozenset[str]:
    extra = {name.strip() for name in os.environ.get(TRUSTED_ENV, "").split(",") if name.strip()}
    return ALLOWED_TARGETS | extra


def foreign_targets(config: Any, path: str = "") -> list[tuple[str, str]]:
    """(key, target) of every `_target_` in `config` that is not trusted, in reading order."""
    trusted = trusted_targets()
    found: list[tuple[str, str]] = []
    if isinstance(config, (DictConfig, ListConfig)):  # as written: interpolations are not resolved
        config = OmegaConf.to_container(config, resolve=False)

    def walk(node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            target = node.get("_target_")
            if target is not None and str(target) not in trusted:
                found.append((f"{where}._target_" if where else "_target_", str(target)))
            for key, value in node.items():
                walk(value, f"{where}.{key}" if where else str(key))
        elif isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
            for index, value in enumerate(node):
                walk(value, f"{where}[{index}]")

    walk(config, path)
    return found


def check_targets(config: Any, source: str) -> None:
    """Refuse, in one line naming the key and the target, a stored config (from `source`, e.g.
    `ckpt_path=<file>`) that would build anything but moelab's own classes."""
    foreign = foreign_targets(config)
    if foreign:
        key, target = foreign[0]
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ConfigError(f"{source}: its stored config has {key}={target}{more}, which moelab does not build from a "
                          f"file (only its own classes; trust more with {TRUSTED_ENV}=<name>,...)")
