"""`last.ckpt`, always the newest state, and everything a resumed run needs to continue
exactly where the stopped one was: the random streams of every rank, and a clean stop on
SIGINT / SIGTERM at the next optimizer-step boundary."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from moelab.moe.experts import local_part
from moelab.parallel.fsdp_ep import is_distributed
from moelab.tasks.divergence import Diverged

log = logging.getLogger(__name__)


def _capture_rng() -> dict[str, Any]:
    """This process's global random streams, as the libraries return them (cheap: taken at
    every training batch, converted only when a checkpoint is written)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_state(captured: dict[str, Any] | None = None) -> dict[str, Any]:
    """This process's global random streams (or `captured` ones) as tensors and plain Python
    values, loadable with `torch.load(weights_only=True)`: torch CPU and CUDA, NumPy, Python's
    `random`."""
    state = dict(captured if captured is not None else _capture_rng())
    _, keys, position, has_gauss, cached_gauss = state["numpy"]
    state["numpy"] = (torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gauss))
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _distributed(trainer: L.Trainer) -> bool:
    return trainer.world_size > 1 and is_distributed()


class StopVote:
    """Whether any rank was asked to stop, agreed by all ranks at an optimizer-step boundary:
    one all-reduce of a flag over a CPU (gloo) group, so no rank waits on its GPU's queue
    for it (the default NCCL group would copy the flag to the device and back, a host sync
    per step). Collective: every rank calls `start` and then `any` at the same points."""

    def __init__(self) -> None:
        self.group: Any = None

    def start(self) -> None:
        if is_distributed() and dist.get_world_size() > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")

    def any(self, flag: bool) -> bool:
        vote = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group)
        return bool(vote[0])


def parameters_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter (this rank's shards) is finite; one host sync."""
    locals_ = [local_part(p).detach() for p in module.parameters()]
    locals_ = [p for p in locals_ if p.numel()]
    if not locals_:
        return True
    norms = torch.stack([norm.float() for norm in torch._foreach_norm(locals_)])
    return bool(torch.isfinite(norms).all())


class LastCheckpoint(Checkpoint):
    """Writes `<dirpath>/last.ckpt` (a folder of shards under `fsdp`/`fsdp_ep`):

    - at the end of every training epoch (after its validation);
    - at the step where a fit stops early: `max_steps` or `max_time` reached, or another
      callback set `trainer.should_stop`;
    - when the run is stopped: on SIGINT or SIGTERM the fit stops at the next optimizer-step
      boundary and saves there (several ranks agree on that step with one all-reduce of a
      flag per step, on the CPU); on an exception it saves the last completed step (on one process; with
      several ranks only a signal-driven stop, which every rank takes at the same step, can
      save, since other ranks may be blocked in a collective).

    Never with non-finite weights, never after a divergence (`moelab.tasks.divergence.Diverged`), and
    atomically (written beside, then renamed over the old one). The checkpoint carries the
    global random streams of every rank, restored on resume (and, like every checkpoint of a
    moelab run, the composed run config: MoETask.on_save_checkpoint).
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        super().__init__()
        self.dirpath, self.filename = Path(dirpath), filename
        self.last_path: Path | None = None  # what this run wrote, for messages
        self.saved_step: int | None = None
        self.signal: int | None = None  # the signal that stopped (or is stopping) the fit
        # How to resume from a checkpoint, as a command to paste (train.py sets the run's own).
        self.resume_hint: Callable[[Path], str] = lambda path: f"the same command plus ckpt_path={path}"
        self._stop_requested = False
        self._step_at_batch_start = -1
        self._rng_at_batch_start: dict[str, Any] | None = None
        self._in_batch = self._updating = False
        self._batch_idx = 0
        self._rewind = False
        self._vote = StopVote()

    @property
    def path(self) -> Path:
        return self.dirpath / self.filename

    # -- random streams ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every rank's random streams (a collective under several ranks: called by every
        rank whenever any checkpoint is dumped), and the run's final metrics so far: a resumed
        run that logs no `train/lr` or `val/*` before it ends still records the values the
        stopped run had logged last, as the uninterrupted run does."""
        mine = rng_state(self._rng_at_batch_start if self._rewind else None)
        if is_distributed() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, mine)
        else:
            states = [mine]
        return {"rng": states, "metrics": self.metrics_so_far()}

    restored_metrics: dict[str, float] = {}
    _trainer: L.Trainer | None = None

    def metrics_so_far(self) -> dict[str, float]:
        """The last value of every metric logged so far in this run, resumed ones included."""
        current = {} if self._trainer is None else self._trainer.callback_metrics
        return {**self.restored_metrics, **{name: float(value) for name, value in current.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored_metrics = dict(state_dict.get("metrics") or {})
        states = state_dict.get("rng") or []
        world = dist.get_world_size() if is_distributed() else 1
        rank = dist.get_rank() if world > 1 else 0
        if len(states) != world:
            rank_zero_warn(
                f"the checkpoint holds the random streams of {len(states)} rank(s) and this run has {world}: weights, "
                "optimizer, schedule and epoch position resume, but each rank's share of the data and its noise and "
                "dropout draws are those of the new world size"
            )
            return
        set_rng_state(states[rank])

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._rewind:
            # Lightning, resuming, counts the interrupted batch's logging step as taken (it
            # expects checkpoints written after a step); this one was written before it.
            epoch_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
            if epoch_loop.get("_batches_that_stepped", 0) > 0:
                epoch_loop["_batches_that_stepped"] -= 1

    # -- when to save --------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """A save that was killed half-way left `.last.ckpt.partial`: it is removed at the next start."""
        self._trainer = trainer
        partial = self.path.with_name(f".{self.path.name}.partial")
        if stage == "fit" and trainer.is_global_zero and partial.exists():
            _remove(partial)
            log.warning("moelab: removed %s, left by a save that did not finish", partial)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _distributed(trainer):
            self._vote.start()
        # After Lightning registered its own handlers; its teardown restores the originals.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            # A second Ctrl+C: stop now, without waiting for the step, and save nothing newer.
            self._abandoned = True
            log.warning("moelab: SIGINT again: stopping now, without saving")
            raise KeyboardInterrupt
        self.signal = signum
        log.warning(
            "moelab: %s received: stopping after the optimizer step in progress and saving %s "
            "(press Ctrl+C again to stop at once)", signal.Signals(signum).name, self.path,
        )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._in_batch, self._batch_idx, self._updating = True, batch_idx, False
        self._step_at_batch_start = trainer.global_step
        self._rng_at_batch_start = _capture_rng()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._updating = True  # from here until the batch ends the weights may be half-updated

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._in_batch = self._updating = False
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        if not (last_batch or (batch_idx + 1) % trainer.accumulate_grad_batches == 0):
            return  # inside a gradient accumulation: not a step boundary
        stop = self.signal is not None
        if _distributed(trainer):
            # A signal reaches the ranks at different moments: agree on the step to stop at
            # (one all-reduce of a flag on the CPU per optimizer step).
            stop = self._vote.any(stop)
        if stop and not self._stop_requested:
            # Lightning's SIGTERM flag: with it set on every rank, Lightning raises
            # SIGTERMException on all of them right after this batch (after a validation that
            # is due, and after the epoch's end on its last batch), and `on_exception` saves there.
            self._stop_requested = True
            trainer._signal_connector.received_sigterm = True
        max_steps_reached = 0 <= trainer.max_steps <= trainer.global_step
        # should_stop is ignored by Lightning until min_steps / min_epochs are met.
        stopping = trainer.should_stop and getattr(trainer.fit_loop, "_can_stop_early", True)
        if (stopping or max_steps_reached) and not last_batch:
            self._save(trainer, pl_module)  # the epoch end (and its validation) will not come

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's evaluation loop also obeys its SIGTERM flag, and would stop the validation
        # that is due before the stop half-way, in a state no checkpoint can hold: let it finish.
        if self._stop_requested:
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stop_requested:
            trainer._signal_connector.received_sigterm = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module)

    _abandoned = False  # a second SIGINT: stop at once, nothing saved

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._abandoned:
            return
        if self.signal is None and isinstance(exception, KeyboardInterrupt):
            self.signal = signal.SIGINT  # Ctrl+C before training started, or at once twice
        if isinstance(exception, Diverged) or trainer.sanity_checking or not self._has_new_state(trainer):
            return
        why_not = self._unsaveable(trainer, exception)
        if why_not:
            rank_zero_warn(f"moelab: not saving {self.path} after {type(exception).__name__}: {why_not}; "
                           "the last checkpoint written stays")
            return
        # An exception inside a training batch before its optimizer step: the weights are
        # still those of the last completed step, so save them with the random streams of
        # that moment (the data position is Lightning's count of completed batches).
        self._rewind = self._before_step(trainer)
        try:
            self._save(trainer, pl_module)
        except Exception as save_error:  # noqa: BLE001 - never hide the exception that stopped the run
            rank_zero_warn(f"moelab: could not save {self.path} after {type(exception).__name__}: {save_error}")
            return
        finally:
            self._rewind = False
        if self.signal is None and trainer.is_global_zero and self.last_path is not None:
            log.error("moelab: saved %s (step %d) after %s; resume with: %s",
                      self.last_path, self.saved_step, type(exception).__name__, self.resume_hint(self.last_path))

    def _before_step(self, trainer: L.Trainer) -> bool:
        """Inside a training batch whose optimizer step has not been counted yet."""
        return self._in_batch and trainer.global_step == self._step_at_batch_start

    def _unsaveable(self, trainer: L.Trainer, exception: BaseException) -> str | None:
        """Why the state at an exception cannot be saved as a resumable step, or None."""
        if _distributed(trainer) and not isinstance(exception, SIGTERMException):
            return "other ranks may be blocked in a collective"
        if trainer.validating:
            return "it came during validation, whose partial results no checkpoint holds"
        before_step = self._before_step(trainer)
        if before_step and self._updating:
            return "it came during an optimizer step (the weights may be half-updated)"
        if before_step and self._batch_idx % trainer.accumulate_grad_batches:
            return "it came inside a gradient accumulation, whose gradients no checkpoint holds"
        return None

    # -- how to save ---------------------------------------------------------------------

    def _has_new_state(self, trainer: L.Trainer) -> bool:
        """Whether training moved since the last save (or since the run started)."""
        if self.saved_step == trainer.global_step:
            return False
        return trainer.global_step > 0 or self.saved_step is not None

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or not self._has_new_state(trainer):
            return
        guard = getattr(pl_module, "guard", None)  # a moelab task's divergence guard: raises Diverged
        if guard is not None:
            guard.check(pl_module)
        finite = trainer.strategy.reduce_boolean_decision(parameters_finite(pl_module), all=True)
        if not finite:
            rank_zero_warn(f"moelab: not saving {self.path}: the weights at step {trainer.global_step} are not finite")
            return
        final = self.path
        partial = final.with_name(f".{final.name}.partial")
        if trainer.is_global_zero:
            final.parent.mkdir(parents=True, exist_ok=True)
            _remove(partial)
        trainer.strategy.barrier("moelab.LastCheckpoint.before_save")
        try:
            trainer.save_checkpoint(partial, weights_only=False)
            if trainer.is_global_zero:
                _replace(partial, final)
        except OSError as exc:
            if _distributed(trainer):
                raise  # the other ranks wait at the barrier below: the run must end
            _remove(partial)
            newest = (f"{self.last_path} (step {self.saved_step}) is the newest good one" if self.last_path is not None
                      else "no checkpoint was written before it")
            rank_zero_warn(f"moelab: could not save {final} at step {trainer.global_step} ({type(exc).__name__}: "
                           f"{exc.strerror or exc}); {newest}; training goes on")
            return
        trainer.strategy.barrier("moelab.LastCheckpoint.after_save")
        self.saved_step, self.last_path = trainer.global_step, final


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _replace(source: Path, target: Path) -> None:
    """Move `source` over `target` (a file, or a folder of shards) without a moment where
    neither a complete old nor a complete new checkpoint exists at a known name."""
    if source.is_file() and not target.is_dir():
        os.replace(source, target)
        return
    previous = target.with_name(f".{target.name}.previous")
    _remove(previous)
    if target.exists():
        os.replace(target, previous)
    os.replace(source, target)
    _remove(previous)
