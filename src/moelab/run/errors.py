"""How a run, or an entry point beside train.py, ends on a mistake: a configuration error is one
line (`moelab: error: ...`) and exit 1, never a traceback, unless MOELAB_DEBUG=1 or
hydra.verbose asks for it. Light: no torch."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf.errors import InterpolationResolutionError

from moelab.moe.errors import ConfigError

DEBUG_ENV = "MOELAB_DEBUG"


def user_error(exc: BaseException) -> BaseException | None:
    """The first configuration error in an exception's `raise … from` chain (Hydra wraps them
    so); not its `__context__`, which a bug raised while handling a user error would have.

    Configuration errors are moelab's ConfigError and Lightning's MisconfigurationException,
    reported in one line, never as a traceback. (Not FileNotFoundError: moelab reports a
    missing input as a ConfigError naming the fix; any other missing file is a fault to show
    in full.)"""
    from lightning.fabric.utilities.exceptions import (
        MisconfigurationException,  # lightning imports torch: late
    )

    while exc is not None:
        if isinstance(exc, (ConfigError, MisconfigurationException)):
            return exc
        # A resolver's error (${moelab.image_classes:...}): OmegaConf keeps only its text.
        if isinstance(exc, InterpolationResolutionError) and str(exc).startswith(RESOLVER_ERROR):
            return ConfigError(str(exc).splitlines()[0][len(RESOLVER_ERROR):])
        exc = exc.__cause__
    return None


RESOLVER_ERROR = "ConfigError raised while resolving interpolation: "


def first_line(exc: BaseException) -> str:
    """The message's first line; for an exception a DataLoader worker raised ("Caught X in
    DataLoader worker process 0. Original Traceback ..."), the original message."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "Original Traceback" in text:
        original = lines[-1]
        return original.split(": ", 1)[1] if ": " in original else original
    return lines[0]


class RunEnded(SystemExit):
    """How `run` ends a run that did not end ok: the exit code, and (as `str`) the one
    line it printed."""

    def __init__(self, code: int, line: str) -> None:
        super().__init__(code)
        self.line = line

    def __str__(self) -> str:
        return self.line


def to_log_file(line: str) -> None:
    """Append `line` to the run's log file (Hydra's `train.log`: the root logger's file
    handlers), so what is printed at the end of a run is in the log too."""
    import logging

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                handler.acquire()
                handler.stream.write(line + "\n")
                handler.flush()
            except (OSError, ValueError, AttributeError):
                pass  # a closed or unwritable log never hides the line printed
            finally:
                handler.release()


def say(line: str) -> str:
    """Print one line on stderr in one write (the ranks of a run share the terminal);
    ranks other than 0 say which they are. Returns the line."""
    from lightning.pytorch.utilities import rank_zero_only

    rank = getattr(rank_zero_only, "rank", 0)
    if rank:
        for head in ("moelab: error: ", "moelab: "):
            if line.startswith(head):
                line = f"{head[:-2]} (rank {rank}): {line[len(head):]}"
                break
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    to_log_file(line)
    return line


def debug_requested() -> bool:
    """`MOELAB_DEBUG=1` or `hydra.verbose=true`: let errors end in their full traceback."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    return HydraConfig.initialized() and bool(HydraConfig.get().verbose)


@contextmanager
def one_line_errors(run_folder: str | Path | None = None):
    """A ConfigError (or Lightning's MisconfigurationException) anywhere in the `raise ... from`
    chain ends the program with `moelab: error: <its first line>` and exit 1, no traceback
    (`MOELAB_DEBUG=1` keeps it), and removes `run_folder` if it holds only what Hydra wrote;
    anything else propagates."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a configuration mistake
        found = user_error(exc)
        if found is None or debug_requested():
            raise
        if run_folder is not None:
            from moelab.run.folder import remove_unused_run_folder

            remove_unused_run_folder(Path(run_folder))
        say(f"moelab: error: {first_line(found)}")
        sys.exit(1)
