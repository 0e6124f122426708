"""run(cfg): build data, model, task, callbacks, loggers and trainer from a Hydra config, fit,
test, write metrics.json with the run's status, and return the metric a sweep optimises."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from moelab.callbacks.checkpoint import LastCheckpoint
from moelab.data.sampling import end_loader_workers
from moelab.models.placement import is_dense_twin
from moelab.moe.errors import ConfigError
from moelab.run import resolvers  # noqa: F401 - registers the ${moelab.*:} resolvers the configs use
from moelab.run.build import build, check_config
from moelab.run.checkpoints import (
    check_resumable,
    start_from_teacher,
    start_from_weights,
)
from moelab.run.errors import (
    RunEnded,
    debug_requested,
    first_line,
    say,
    to_log_file,
    user_error,
)
from moelab.run.folder import RunLock, check_writable, remove_unused_run_folder
from moelab.run.launch import (
    in_multirun,
    relaunch_as_single_run,
    requeued_checkpoint,
    restored_launcher_env,
)
from moelab.run.names import rerun_command
from moelab.run.quiet import quiet_third_party
from moelab.run.records import (
    DIVERGED,
    ERROR,
    INTERRUPTED,
    METRICS_FILE,
    OK,
    write_record,
)
from moelab.run.summary import print_config_tree, run_hparams, summary_line
from moelab.tasks.checkpoint_io import load_model
from moelab.tasks.divergence import Diverged

log = logging.getLogger(__name__)

# Lightning gives its logger a console handler of its own; under Hydra the root logger
# already prints (and writes the run's log file), so drop Lightning's to avoid every
# line appearing twice.
if logging.getLogger().hasHandlers():
    logging.getLogger("lightning").handlers.clear()


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
    diverged_at: int | None = None  # the step a diverged run's guard named (found at a later check)

    def metrics(self) -> dict[str, Any]:
        """The last value of every metric the run logged; a resumed run's include those the
        stopped run logged last (LastCheckpoint keeps them)."""
        if self.last is not None:
            return self.last.metrics_so_far()
        if self.trainer is None:
            return {}
        return {name: float(value) for name, value in self.trainer.callback_metrics.items()}

    def step(self) -> int | None:
        if self.diverged_at is not None:
            return self.diverged_at
        return None if self.trainer is None else self.trainer.global_step

    def newest_checkpoint(self) -> tuple[str, str] | None:
        """(path, what it is) of the newest resumable state: what this run saved, else what
        it resumed from."""
        if self.last is not None and self.last.last_path is not None:
            return str(self.last.last_path), f"step {self.last.saved_step}"
        return (self.ckpt_path, "where this run resumed from") if self.ckpt_path else None


@rank_zero_only
def _write_record(run_state: _Run, status: str, reason: str | None, metrics: dict[str, Any] | None = None) -> None:
    if run_state.output_dir is None:
        return
    try:
        write_record(run_state.output_dir / METRICS_FILE, run_state.metrics() if metrics is None else metrics,
                     status, reason, run_state.step())
    except OSError as exc:  # the record's place is not writable: say so, never hide how the run ended
        log.error("moelab: could not write %s (%s: %s)", run_state.output_dir / METRICS_FILE, type(exc).__name__,
                  exc.strerror or exc)


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
    quiet_third_party(debug_requested())
    run_state = _Run(started=time.monotonic())
    lock = RunLock(Path(cfg.paths.output_dir))
    try:
        run_state.output_dir = Path(cfg.paths.output_dir)
        check_config(cfg)
        check_writable(run_state.output_dir, OmegaConf.to_container(cfg.get("callbacks") or {}, resolve=True))
        if launching_process():
            lock.acquire()  # one run per folder: the ranks it starts share it
        relaunch_as_single_run()
        with restored_launcher_env():
            return _fit_and_test(cfg, run_state)
    except BaseException as exc:  # noqa: BLE001 - every ending is recorded, then reported or re-raised
        end_loader_workers()  # the fit's loaders are done with: their workers would outlive it
        return _report(exc, run_state)
    finally:
        lock.release()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # the next job of a multirun starts its own process group


def launching_process() -> bool:
    """This process started the run: not a rank Lightning's launcher started (LOCAL_RANK >= 1),
    nor a rank > 0 of torchrun or SLURM (RANK)."""
    return all(os.environ.get(key, "0") in ("", "0") for key in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))


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
            then = f"newest checkpoint {newest[0]} ({newest[1]}); resume with: {rerun_command(ckpt_path=newest[0])}"
        else:
            then = "no checkpoint was written"
        elsewhere = trainer is not None and trainer.world_size > 1 and run_state.last is not None and run_state.last.signal is None
        by = "a signal to another rank" if elsewhere else signal.Signals(signum).name
        reason = f"stopped by {by} {where}; {then}"
        _write_record(run_state, INTERRUPTED, reason)
        raise RunEnded(128 + int(signum), say(f"moelab: {reason}")) from None
    if isinstance(exc, SystemExit):
        raise exc  # not ours to reinterpret
    if isinstance(exc, Diverged):
        run_state.diverged_at = exc.step
        newest = run_state.newest_checkpoint()
        good = f"last good checkpoint: {newest[0]} ({newest[1]})" if newest else "no checkpoint was written before it"
        status, reason = DIVERGED, f"{exc}; {good}"
        if run_state.lr is not None and "input batch" not in exc.what:
            reason += f"; try a lower task.lr (here {run_state.lr:g}) or more task.warmup_steps"
    elif (mistake := user_error(exc)) is not None:
        status, reason = ERROR, first_line(mistake)
    else:
        status, reason = ERROR, f"{type(exc).__name__}: {first_line(exc)}"
        _write_record(run_state, status, reason)
        if in_multirun() and not debug_requested():
            log.exception("moelab: this job failed; the sweep goes on")
            return
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
        return
    raise RunEnded(1, say(f"moelab: error: {reason}")) from None


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as plain values (for checkpoints: weights_only loading)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: keep it as written
        return OmegaConf.to_container(cfg, resolve=False)


def _fit_and_test(cfg: DictConfig, run_state: _Run) -> float | None:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    config = plain_config(cfg)
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    if HydraConfig.initialized():
        rank_zero_only(print_config_tree)(config, choices)
    datamodule, task, trainer = build(cfg)
    run_state.trainer = trainer
    run_state.lr = task.hparams.get("lr")
    run_state.last = next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
    if run_state.last is not None:
        run_state.last.resume_hint = lambda path: rerun_command(ckpt_path=path)
    task.run_config = config  # every checkpoint of the run carries it (moelab.load, eval.py)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    task.run_hparams = run_hparams(config, choices, overrides)
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
                                  float(model_cfg.get("upcycle_noise", 0.0)), float(model_cfg.get("upcycle_router_std", 0.02)),
                                  seed=cfg.seed)
        if trainer.is_global_zero:
            log.info(line)
    if cfg.get("teacher_init_shared") and not cfg.get("teacher"):
        raise ConfigError("teacher_init_shared=true copies weights from the teacher: add teacher=<checkpoint>")
    if cfg.get("teacher"):  # attached on every start, resumed or not: checkpoints leave it out
        teacher = load_model(str(cfg.teacher))
        if cfg.get("teacher_init_shared") and ckpt_path is None:
            if init_from:
                raise ConfigError("teacher_init_shared=true and init_from both set the starting weights: pick one")
            line = start_from_teacher(task.model, teacher)
            if trainer.is_global_zero:
                log.info(line)
        task.attach_teacher(teacher)
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
        line = summary_line(metrics, best, last, str(run_state.output_dir / METRICS_FILE), time.monotonic() - run_state.started,
                            dense_twin=is_dense_twin(cfg.model))
        print(line, flush=True)
        to_log_file(line)

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
