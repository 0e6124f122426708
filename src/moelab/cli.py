"""What the entry points beside train.py share: configuration mistakes end in one line."""

from __future__ import annotations

import shutil
import sys
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def one_line_errors(run_folder: str | Path | None = None):
    """A ConfigError (or Lightning's MisconfigurationException) anywhere in the `raise ... from`
    chain ends the program with `moelab: error: <its first line>` and exit 1, no traceback
    (`MOELAB_DEBUG=1` keeps it), and removes `run_folder` if it holds only what Hydra wrote;
    anything else propagates."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a configuration mistake
        from moelab.train import _first_line, _say, _user_error, debug_requested

        user_error = _user_error(exc)
        if user_error is None or debug_requested():
            raise
        if run_folder is not None:
            remove_unused_run_folder(Path(run_folder))
        _say(f"moelab: error: {_first_line(user_error)}")
        sys.exit(1)


def remove_unused_run_folder(folder: Path) -> bool:
    """Delete the folder Hydra made for a single run that ended before it produced anything
    (a configuration error): it holds only `.hydra/`, log files and possibly the run's
    `metrics.json`. Never in a multirun (the sweep summary reads each job's record), never a
    folder Hydra did not make for this run. Returns whether it was removed."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN or not folder.is_dir():
        return False
    if Path(HydraConfig.get().runtime.output_dir).resolve() != folder.resolve():
        return False
    if any(p.name not in (".hydra", "metrics.json") and p.suffix != ".log" for p in folder.iterdir()):
        return False
    import logging

    logging.shutdown()  # close the log file handlers before their folder goes
    shutil.rmtree(folder, ignore_errors=True)
    return True


def take_verbatim(key: str, args: list[str]) -> tuple[list[str], list[str]]:
    """([the raw text of `key=<text>`] or [], the other args): Hydra's parser strips spaces
    and reads quotes and brackets, so free text such as a prompt is taken as typed."""
    found, rest = [], []
    for arg in args:
        if arg.startswith(f"{key}="):
            found = [arg[len(key) + 1:]]
        else:
            rest.append(arg)
    return found, rest


def require(keys: tuple[str, ...], args: list[str], usage: str) -> None:
    """One line and exit 1 when a mandatory `key=` is missing from the command line (Hydra's
    own message would be a "Missing mandatory value" paragraph and an empty run folder)."""
    missing = [key for key in keys if not any(arg.lstrip("+").startswith(f"{key}=") for arg in args)]
    if missing and not any(arg in ("--help", "-h", "--cfg", "-c", "--info", "--hydra-help") or arg.startswith("--cfg")
                           for arg in args):
        sys.stderr.write(f"moelab: error: {' and '.join(f'{k}=' for k in missing)} missing: {usage}\n")
        sys.exit(1)


# Config choices that need a Hydra plugin from an extra: (override prefix, module, extra).
PLUGINS = (
    ("hparams_search=optuna", "hydra_plugins.hydra_optuna_sweeper", "sweep"),
    ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "sweep"),
    ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher", "slurm"),
)


def check_plugins(args: list[str], find_spec=None) -> None:
    """One line and exit 1 when the command line picks a Hydra plugin that is not installed
    (Hydra's own message is a paragraph about its plugin search path)."""
    import importlib.util

    find_spec = find_spec or importlib.util.find_spec
    for arg in args:
        for prefix, module, extra in PLUGINS:
            if arg.lstrip("+").startswith(prefix):
                try:
                    found = find_spec(module) is not None
                except ModuleNotFoundError:
                    found = False
                if not found:
                    sys.stderr.write(f"moelab: error: {arg.lstrip('+')} needs a Hydra plugin that is not installed: "
                                     f"pip install -e \".[{extra}]\"\n")
                    sys.exit(1)
