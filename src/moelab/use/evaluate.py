"""`python eval.py ckpt_path=<checkpoint>`: a trained model's test (or validation) metrics.

The run's own config comes from the checkpoint: the model as trained, and the data, task and
trainer settings it ran with, so the test metrics of the training run come out again. The
command line may change the data (`data.root=...`, `data.batch_size=...`, or another option
`data=<name>`), the task's evaluation settings (`task.*`) and the trainer (`trainer.*`,
`trainer=<name>`); the model cannot change. The evaluation runs in one process (a sharded
checkpoint is read whole) and writes its own run folder: TensorBoard logs with the expert
utilisation and specialisation views of the evaluated data, and `metrics.json`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from moelab.moe.errors import ConfigError

log = logging.getLogger(__name__)

# Top-level keys of the run's config the command line may change, and those it may not.
CHANGEABLE = ("data", "task", "trainer")
FIXED = ("model", "router", "expert", "loss", "experts", "ep", "tokenizer", "init_from", "teacher", "seed")
SPLITS = ("test", "val")


def split_run_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(overrides of the checkpoint's run config, the rest for Hydra): `data.x=1`,
    `data=cifar10`, `task.x=...`, `trainer.x=...` belong to the run; changing the model is
    refused in one line."""
    run, rest = [], []
    for arg in args:
        key = arg.lstrip("+~").split("=", 1)[0]
        root = key.split(".", 1)[0]
        if root in CHANGEABLE:
            run.append(arg)
        elif root in FIXED:
            raise ConfigError(f"{key} is part of the trained model: eval.py evaluates the checkpoint as it was "
                              f"trained (it may change {', '.join(f'{k}.*' for k in CHANGEABLE)})")
        else:
            rest.append(arg)
    return run, rest


def apply_run_overrides(saved: dict[str, Any], overrides: Sequence[str]) -> DictConfig:
    """The checkpoint's config with `overrides` applied: a group choice (`data=cifar10`)
    replaces that part by the option's config (resolved as `train.py` would); a key
    (`data.root=...`, `+data.x=...`, `~data.x`) is set or deleted."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    merged = OmegaConf.create(saved)
    parser = OverridesParser.create()
    for text in overrides:
        override = parser.parse_override(text)
        key = override.key_or_group
        if "." not in key and not override.is_delete():  # a group choice: the option's own config
            option = compose(config_name="train", overrides=[text])
            merged[key] = OmegaConf.to_container(option[key], resolve=True)
        elif override.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(merged, parent)
            if node is None or leaf not in node:
                raise ConfigError(f"~{key}: the run's config has no {key}")
            node.pop(leaf)
        else:
            if OmegaConf.select(merged, key, default="__missing__") == "__missing__" and not override.is_add():
                raise ConfigError(f"{key} is not in the run's config: add it with +{key}=..., or check the spelling")
            OmegaConf.update(merged, key, override.value(), merge=False, force_add=True)
    return merged


def single_process_trainer(trainer_cfg: DictConfig, output_dir: str) -> DictConfig:
    """The run's trainer settings for one process: evaluation needs no ranks (a sharded
    checkpoint is read whole), and writes into this folder."""
    trainer_cfg = OmegaConf.create(OmegaConf.to_container(trainer_cfg))
    for key in ("strategy", "sync_batchnorm"):
        trainer_cfg.pop(key, None)
    if trainer_cfg.get("devices") not in (1, None) or trainer_cfg.get("num_nodes", 1) != 1:
        trainer_cfg.devices, trainer_cfg.num_nodes = 1, 1
    trainer_cfg.default_root_dir = output_dir
    return trainer_cfg


def evaluate(cfg: DictConfig, run_overrides: Sequence[str] = ()) -> dict[str, float]:
    """Evaluate `cfg.ckpt_path` on `cfg.split` (test or val); returns the metrics, also
    written to `metrics.json` in `cfg.paths.output_dir`."""
    from hydra.utils import instantiate

    from moelab.run.build import instantiate_all
    from moelab.run.records import METRICS_FILE, OK, write_record
    from moelab.tasks.checkpoint_io import checkpoint_step, model_from_state, read_model_state

    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split} must be one of {', '.join(SPLITS)}")
    path = str(cfg.ckpt_path)
    weights, saved = read_model_state(path, "ckpt_path")
    if saved is None:
        raise ConfigError(f"ckpt_path={path} carries no run config: evaluate a checkpoint written by moelab's train.py")
    run_cfg = apply_run_overrides(saved, run_overrides)
    model = model_from_state(weights, saved, "ckpt_path", path)
    output_dir = Path(cfg.paths.output_dir)
    callbacks = [cb for cb in instantiate_all(cfg.get("callbacks")) if "Checkpoint" not in type(cb).__name__]
    for callback in callbacks:
        if hasattr(callback, "on_test"):
            callback.on_test = True  # the utilisation and specialisation views of the evaluated data
    datamodule = instantiate(run_cfg.data, _convert_="all")
    task = instantiate(run_cfg.task, model=model, _convert_="all")
    trainer = instantiate(single_process_trainer(run_cfg.trainer, str(output_dir)), callbacks=callbacks,
                          logger=instantiate_all(cfg.get("logger")) or False)
    loop = trainer.test if cfg.split == "test" else trainer.validate
    metrics: dict[str, float] = {}
    for result in loop(task, datamodule=datamodule, verbose=True):
        metrics.update({name: float(value) for name, value in result.items()})
    step = checkpoint_step(path)
    write_record(output_dir / METRICS_FILE, metrics, OK, None, step)
    shown = ", ".join(f"{name} {value:.4g}" for name, value in sorted(metrics.items()) if name.startswith(f"{cfg.split}/"))
    print(f"moelab: evaluated {path} (step {step}) on {cfg.split}: {shown}; metrics: {output_dir / METRICS_FILE}",
          flush=True)
    return metrics
