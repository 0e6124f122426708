"""A run's folder: one run at a time (a lock), writable before training starts, the leftovers of
a killed save removed, and removed again when the run is refused before it began. Light: no
torch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Mapping

from moelab.moe.errors import ConfigError
from moelab.run.records import METRICS_FILE

log = logging.getLogger(__name__)

LOCK_FILE = ".moelab.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class RunLock:
    """`<folder>/.moelab.lock`, created atomically, holding the owner's pid and host. A second
    run into the folder is refused in one line naming the running process; a lock whose
    process is gone (the run was killed), or that a requeued SLURM job left, is taken over
    with a line saying so."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "slurm_job": os.environ.get("SLURM_JOB_ID")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                gone = owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) and not _alive(owner["pid"])
                requeued = me["slurm_job"] is not None and owner.get("slurm_job") == me["slurm_job"]  # the same job, restarted
                if gone or requeued:
                    log.warning("moelab: %s was left by process %s%s: taking it over", self.path, owner.get("pid"),
                                ", which is gone" if gone else f" of this SLURM job ({me['slurm_job']}), requeued")
                    self.path.unlink(missing_ok=True)
                    continue
                who = f"process {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}"
                raise ConfigError(f"{self.path.parent} is the folder of a run in progress ({who}): let it finish, or "
                                  f"give this run its own folder (hydra.run.dir=...); if that run is gone, delete {self.path}")
            with os.fdopen(descriptor, "w") as file:
                json.dump(me, file)
            self.held = True
            return
        raise ConfigError(f"could not take the lock {self.path}")

    def _owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def check_writable(output_dir: Path, callbacks: Mapping[str, Any] | None) -> None:
    """The run folder, every checkpoint folder of the callbacks and the record's path can be
    written (a probe file is created and removed in each), so a run does not train to its
    end and then fail to save."""
    folders = [("the run folder", Path(output_dir))]
    for name, callback in (callbacks or {}).items():
        if isinstance(callback, Mapping) and callback.get("dirpath"):
            folders.append((f"callbacks.{name}.dirpath", Path(str(callback["dirpath"]))))
    for what, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".moelab-probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"{what} {folder} cannot be written ({type(exc).__name__}: {exc.strerror or exc}): "
                              "pick a folder this user can write") from None
    record = Path(output_dir) / METRICS_FILE
    if record.exists() and not record.is_file():
        raise ConfigError(f"{record} is not a file: the run writes its record there; remove it or give the run "
                          "another folder (hydra.run.dir=...)")


def remove_unused_run_folder(folder: Path) -> bool:
    """Delete the folder Hydra made for a single run that ended before it produced anything
    (a configuration error): it holds only `.hydra/`, log files and possibly the run's
    `metrics.json`. Never in a multirun (the sweep summary reads each job's record), never a
    folder Hydra did not make for this run. Returns whether it was removed."""
    from hydra.core.hydra_config import HydraConfig  # light as this module is: only when needed
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN or not folder.is_dir():
        return False
    if Path(HydraConfig.get().runtime.output_dir).resolve() != folder.resolve():
        return False
    def left_by_hydra(p: Path) -> bool:  # or by the checks at the start: a lock, empty folders
        return (p.name in (".hydra", METRICS_FILE, LOCK_FILE) or p.suffix == ".log"
                or (p.is_dir() and not any(p.rglob("*"))))

    if not all(left_by_hydra(p) for p in folder.iterdir()):
        return False
    logging.shutdown()  # close the log file handlers before their folder goes
    shutil.rmtree(folder, ignore_errors=True)
    return True
