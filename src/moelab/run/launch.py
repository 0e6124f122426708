"""A run inside the processes that start it: Lightning's per-rank relaunch within a Hydra
multirun, the launcher's environment undone between jobs, and a requeued SLURM job finding
its checkpoint."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write

from moelab.callbacks.checkpoint import LastCheckpoint

log = logging.getLogger(__name__)


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


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def requeued_checkpoint(last: LastCheckpoint | None) -> str | None:
    """A SLURM job that was requeued (SLURM_RESTART_COUNT > 0) and runs in the folder of its
    first start (a stable `hydra.run.dir`) continues from that folder's last.ckpt: the exact
    state the preempted run saved on SIGTERM (Lightning's own `hpc_ckpt_*.ckpt`, written from
    its SIGUSR1 handler, is its fallback when there is none)."""
    if last is None or os.environ.get("SLURM_RESTART_COUNT", "0") in ("", "0") or not last.path.exists():
        return None
    log.info("Requeued SLURM job: resuming from %s", last.path)
    return str(last.path)
