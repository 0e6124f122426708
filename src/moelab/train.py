"""run(cfg): build data, model, task, callbacks, loggers and trainer from a Hydra config, fit,
test, write metrics.json with the run's status, and return the metric a sweep optimises."""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import InterpolationResolutionError

from moelab.callbacks.checkpoint import LastCheckpoint
from moelab.cli import remove_unused_run_folder
from moelab.checkpoints import check_resumable, start_from_weights
from moelab import resolvers  # noqa: F401 - registers ${moelab.image_classes:} and ${moelab.patch_size:}
from moelab.moe.errors import ConfigError, check_num_experts
from moelab.runs import DIVERGED, ERROR, INTERRUPTED, METRICS_FILE, OK, Diverged, write_record
from moelab.summary import print_config_tree, run_hparams, summary_line
from moelab.sweep import run_version  # noqa: F401 - registers ${moelab.run_version:} for the logger config

log = logging.getLogger(__name__)

# Lightning gives its logger a console handler of its own; under Hydra the root logger
# already prints (and writes the run's log file), so drop Lightning's to avoid every
# line appearing twice.
if logging.getLogger().hasHandlers():
    logging.getLogger("lightning").handlers.clear()

# Errors that mean "the configuration is wrong": reported in one line, never as a traceback.
# (Not FileNotFoundError: moelab reports a missing input as a ConfigError naming the fix; any
# other missing file is a fault to show in full.)
USER_ERRORS = (ConfigError, MisconfigurationException)
DEBUG_ENV = "MOELAB_DEBUG"


def _user_error(exc: BaseException) -> BaseException | None:
    """The first configuration error in an exception's `raise … from` chain (Hydra wraps them
    so); not its `__context__`, which a bug raised while handling a user error would have."""
    while exc is not None:
        if isinstance(exc, USER_ERRORS):
            return exc
        # A resolver's error (${moelab.image_classes:...}): OmegaConf keeps only its text.
        if isinstance(exc, InterpolationResolutionError) and str(exc).startswith(RESOLVER_ERROR):
            return ConfigError(str(exc).splitlines()[0][len(RESOLVER_ERROR):])
        exc = exc.__cause__
    return None


RESOLVER_ERROR = "ConfigError raised while resolving interpolation: "


def _instantiate_all(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a dict-of-configs group (callbacks, logger)."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


# model.* settings of sparse upcycling: read by `init_from`, not passed to the model class.
UPCYCLE_KEYS = ("upcycle", "upcycle_noise", "upcycle_router_std")


def build_model(cfg: DictConfig) -> "torch.nn.Module":
    """The model of a composed config (`model`, `router`, `expert`, `loss`)."""
    model_cfg = cfg.model
    if any(key in model_cfg for key in UPCYCLE_KEYS):  # used by init_from, not by the model
        model_cfg = copy.deepcopy(model_cfg)
        with open_dict(model_cfg):
            for key in UPCYCLE_KEYS:
                model_cfg.pop(key, None)
    try:
        return instantiate(
            model_cfg,
            router=cfg.router,
            expert=cfg.expert,
            aux_loss_weights=OmegaConf.to_container(cfg.loss, resolve=True) if cfg.loss else {},
            _convert_="all",
        )
    except Exception as exc:
        error = _unknown_setting(cfg, exc)
        if error is None:
            raise
        raise error from None


def _unknown_setting(cfg: DictConfig, exc: BaseException | None) -> ConfigError | None:
    """A router or expert setting its class does not take (`+router.token_mask=...` on a
    router without a mask) as one line, instead of Hydra's wrapped TypeError."""
    while exc is not None:
        found = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(exc))
        if isinstance(exc, TypeError) and found:
            cls, key = found.groups()
            for group in ("router", "expert"):
                node = cfg.get(group)
                if node is not None and str(node.get("_target_", "")).endswith(f".{cls}") and key in node:
                    return ConfigError(f"{group}.{key} is not a setting of {cls}: drop it, or pick a {group} that "
                                       f"has it (conf/{group}/)")
            return None
        exc = exc.__cause__
    return None


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Instantiate data, model, task and trainer; config mistakes surface as ConfigError."""
    # `_convert_="all"`: plain lists and dicts reach the code (and checkpoints' hparams,
    # which Lightning reloads with weights_only=True), never OmegaConf containers.
    datamodule = instantiate(cfg.data, _convert_="all")
    task = instantiate(cfg.task, model=build_model(cfg), _convert_="all")
    trainer = instantiate(cfg.trainer, callbacks=_instantiate_all(cfg.get("callbacks")), logger=_instantiate_all(cfg.get("logger")) or False)
    return datamodule, task, trainer


def _int_setting(cfg: DictConfig, key: str, minimum: int | None = None) -> None:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be a whole number")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}")


def check_config(cfg: DictConfig) -> None:
    """Top-level keys and cross-group mistakes no single component can see."""
    _int_setting(cfg, "seed")
    check_num_experts(cfg.get("experts"))
    _int_setting(cfg, "ep", minimum=1)
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
        fix = (f"trainer.accelerator=cpu trainer.devices={processes} ({processes} CPU processes, the same strategy)"
               if processes else "trainer=cpu")
        raise ConfigError(f"trainer.accelerator={accelerator}, but this machine has no GPU: run on the CPU with {fix}")
    if wanted is not None and wanted > available:
        raise ConfigError(f"trainer.devices={wanted} asks for {wanted} GPUs, but this machine has {available}: set "
                          f"trainer.devices={available}")


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


@dataclass
class _Run:
    """What a run has built so far, for the record of a run that ends early."""

    output_dir: Path | None = None
    trainer: L.Trainer | None = None
    last: LastCheckpoint | None = None
    ckpt_path: str | None = None
    lr: float | None = None
    started: float = 0.0
    fit_started: bool = False

    def metrics(self) -> dict[str, Any]:
        if self.trainer is None:
            return {}
        return {name: float(value) for name, value in self.trainer.callback_metrics.items()}

    def step(self) -> int | None:
        return None if self.trainer is None else self.trainer.global_step

    def newest_checkpoint(self) -> tuple[str, str] | None:
        """(path, what it is) of the newest resumable state: what this run saved, else what
        it resumed from."""
        if self.last is not None and self.last.last_path is not None:
            return str(self.last.last_path), f"step {self.last.saved_step}"
        return (self.ckpt_path, "where this run resumed from") if self.ckpt_path else None


@rank_zero_only
def _write_record(run_state: _Run, status: str, reason: str | None, metrics: dict[str, Any] | None = None) -> None:
    if run_state.output_dir is not None:
        write_record(run_state.output_dir / METRICS_FILE, run_state.metrics() if metrics is None else metrics,
                     status, reason, run_state.step())


def debug_requested() -> bool:
    """`MOELAB_DEBUG=1` or `hydra.verbose=true`: let errors end in their full traceback."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    return HydraConfig.initialized() and bool(HydraConfig.get().verbose)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run(cfg: DictConfig) -> float | None:
    """Train (and test) as configured; return `metrics[cfg.optimized_metric]` for sweepers.

    Every way a run ends leaves `metrics.json` with its `status`:
    - ok: the metric is returned (None, with a warning, when it was not logged, e.g. a
      run of a few steps that never validated);
    - error (a configuration mistake) and diverged (non-finite loss or gradients): one line
      `moelab: error: …` and exit 1; inside a multirun the job is recorded and the sweep
      goes on;
    - interrupted (SIGINT, SIGTERM): one line naming the checkpoint to resume from, exit
      130 (SIGINT) or 143 (SIGTERM); a multirun stops too.
    Any other exception is recorded as error and keeps its traceback (in a multirun it is
    logged and the next job runs). `MOELAB_DEBUG=1` or `hydra.verbose=true` shows the
    traceback of every error.
    """
    run_state = _Run(started=time.monotonic())
    try:
        run_state.output_dir = Path(cfg.paths.output_dir)
        check_config(cfg)
        relaunch_as_single_run()
        with restored_launcher_env():
            return _fit_and_test(cfg, run_state)
    except BaseException as exc:  # noqa: BLE001 - every ending is recorded, then reported or re-raised
        return _report(exc, run_state)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # the next job of a multirun starts its own process group


def _stopping_signal(exc: BaseException, run_state: _Run) -> int | None:
    """The signal a run was stopped by, or None if `exc` is not a stop."""
    signum = run_state.last.signal if run_state.last is not None else None
    if isinstance(exc, SIGTERMException):
        return signum or signal.SIGTERM  # no signal here: another rank's, or Lightning's own SIGTERM
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    # Lightning turns Ctrl+C inside fit/test into sys.exit(1) after its own shutdown.
    trainer = run_state.trainer
    if isinstance(exc, SystemExit) and trainer is not None and trainer.interrupted:
        return signum or signal.SIGINT
    return None


def _report(exc: BaseException, run_state: _Run) -> None:
    signum = _stopping_signal(exc, run_state)
    if signum is not None:
        trainer = run_state.trainer
        where = f"at step {trainer.global_step}" if trainer is not None else "before training"
        newest = run_state.newest_checkpoint()
        if newest is not None:
            then = f"newest checkpoint {newest[0]} ({newest[1]}): resume with the same command plus ckpt_path={newest[0]}"
        else:
            then = "no checkpoint was written"
        elsewhere = trainer is not None and trainer.world_size > 1 and run_state.last is not None and run_state.last.signal is None
        by = "a signal to another rank" if elsewhere else signal.Signals(signum).name
        reason = f"stopped by {by} {where}; {then}"
        _write_record(run_state, INTERRUPTED, reason)
        raise RunEnded(128 + int(signum), _say(f"moelab: {reason}")) from None
    if isinstance(exc, SystemExit):
        raise exc  # not ours to reinterpret
    if isinstance(exc, Diverged):
        newest = run_state.newest_checkpoint()
        good = f"last good checkpoint: {newest[0]} ({newest[1]})" if newest else "no checkpoint was written before it"
        status, reason = DIVERGED, f"{exc}; {good}"
        if run_state.lr is not None and "input batch" not in exc.what:
            reason += f"; try a lower task.lr (here {run_state.lr:g}) or more task.warmup_steps"
    elif (user_error := _user_error(exc)) is not None:
        status, reason = ERROR, _first_line(user_error)
    else:
        status, reason = ERROR, f"{type(exc).__name__}: {_first_line(exc)}"
        _write_record(run_state, status, reason)
        if in_multirun() and not debug_requested():
            log.exception("moelab: this job failed; the sweep goes on")
            return None
        raise exc
    if debug_requested():
        _write_record(run_state, status, reason)
        raise exc
    # A single run refused before training leaves no folder behind (a multirun keeps the
    # job's record for its summary).
    if status != ERROR or run_state.fit_started or run_state.output_dir is None or not remove_unused_run_folder(run_state.output_dir):
        _write_record(run_state, status, reason)
    if in_multirun():
        log.error(f"moelab: error: {reason}")
        return None
    raise RunEnded(1, _say(f"moelab: error: {reason}")) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RunEnded(SystemExit):
    """How `run` ends a run that did not end ok: the exit code, and (as `str`) the one
    line it printed."""

    def __init__(self, code: int, line: str) -> None:
        super().__init__(code)
        self.line = line

    def __str__(self) -> str:
        return self.line


def _say(line: str) -> str:
    """Print one line on stderr in one write (the ranks of a run share the terminal);
    ranks other than 0 say which they are. Returns the line."""
    rank = getattr(rank_zero_only, "rank", 0)
    if rank:
        for head in ("moelab: error: ", "moelab: "):
            if line.startswith(head):
                line = f"{head[:-2]} (rank {rank}): {line[len(head):]}"
                break
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    return line


def requeued_checkpoint(last: LastCheckpoint | None) -> str | None:
    """A SLURM job that was requeued (SLURM_RESTART_COUNT > 0) and runs in the folder of its
    first start (a stable `hydra.run.dir`) continues from that folder's last.ckpt: the exact
    state the preempted run saved on SIGTERM (Lightning's own `hpc_ckpt_*.ckpt`, written from
    its SIGUSR1 handler, is its fallback when there is none)."""
    if last is None or os.environ.get("SLURM_RESTART_COUNT", "0") in ("", "0") or not last.path.exists():
        return None
    log.info("Requeued SLURM job: resuming from %s", last.path)
    return str(last.path)


def _plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as plain values (for checkpoints: weights_only loading)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: keep it as written
        return OmegaConf.to_container(cfg, resolve=False)


def _fit_and_test(cfg: DictConfig, run_state: _Run) -> float | None:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    config = _plain_config(cfg)
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    if HydraConfig.initialized():
        rank_zero_only(print_config_tree)(config, choices)
    datamodule, task, trainer = build(cfg)
    run_state.trainer = trainer
    run_state.lr = task.hparams.get("lr")
    run_state.last = next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
    task.run_config = config  # every checkpoint of the run carries it (moelab.load, eval.py)
    task.run_hparams = run_hparams(config, choices)
    if trainer.is_global_zero:
        log.info("Run folder: %s", run_state.output_dir)

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        ckpt_path = requeued_checkpoint(run_state.last)
    if ckpt_path is not None:
        ckpt_path = str(ckpt_path)
        sharded = isinstance(trainer.strategy, (ModelParallelStrategy, FSDPStrategy))
        check_resumable(ckpt_path, task, sharded_strategy=sharded, config=config)
        run_state.ckpt_path = ckpt_path
    init_from = cfg.get("init_from")
    if init_from and ckpt_path is None:  # a resumed run has its own weights
        model_cfg = cfg.model
        line = start_from_weights(task.model, str(init_from), bool(model_cfg.get("upcycle", False)),
                                  float(model_cfg.get("upcycle_noise", 0.0)), float(model_cfg.get("upcycle_router_std", 0.0)),
                                  seed=cfg.seed)
        if trainer.is_global_zero:
            log.info(line)
    if cfg.get("teacher"):  # attached on every start, resumed or not: checkpoints leave it out
        from moelab.loading import load_model

        task.attach_teacher(load_model(str(cfg.teacher)))
    # weights_only=True always, URLs included (Lightning would unpickle those in full).
    run_state.fit_started = True
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if run_state.last is not None and run_state.last.signal is not None:
        raise SIGTERMException()  # a signal during the last validation: saved at the end, no test
    metrics = run_state.metrics()
    if cfg.get("test"):
        for result in trainer.test(task, datamodule=datamodule, verbose=False):
            metrics.update({name: float(value) for name, value in result.items()})
    _write_record(run_state, OK, None, metrics)
    if trainer.is_global_zero:
        best = next((cb.best_model_path for cb in trainer.checkpoint_callbacks if getattr(cb, "best_model_path", "")), None)
        last = str(run_state.last.last_path) if run_state.last is not None and run_state.last.last_path else None
        line = summary_line(metrics, best, last, str(run_state.output_dir / METRICS_FILE), time.monotonic() - run_state.started)
        print(line, flush=True)

    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        warnings.warn(
            f"moelab: optimized_metric '{name}' was not logged (the run stopped at step {trainer.global_step}, "
            f"before it was measured), so this run returns no value; logged: {', '.join(sorted(metrics)) or 'nothing'}",
            stacklevel=1,
        )
        return None
    return metrics[name] if math.isfinite(metrics[name]) else None
