"""What the entry points (train.py, eval.py, predict.py, generate.py) share on their command
line before Hydra sees it: mandatory keys, free text taken verbatim, missing plugins. Light:
no torch."""

from __future__ import annotations

import sys
from pathlib import Path


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


def check_run_folder(args: list[str], default: str = "outputs") -> None:
    """One line and exit 1 when the run's folder (`hydra.run.dir=`, `hydra.sweep.dir=` with
    -m, else `default` under the working directory) cannot be made: under a file, on a
    read-only or virtual file system. Hydra makes it before the run starts and reports a
    failure as a traceback. What this check creates it removes again."""
    multirun = any(arg in ("-m", "--multirun") for arg in args)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [arg.split("=", 1)[1] for arg in args if arg.lstrip("+").startswith(f"{key}=")]
    if given and "${" in given[-1]:
        return  # resolved by Hydra: checked when the run starts
    folder = Path(given[-1] if given else default).expanduser()
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".moelab-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        shown = f"{key}={given[-1]}" if given else f"the run folder {folder.resolve()}"
        sys.stderr.write(f"moelab: error: {shown} cannot be made ({type(exc).__name__}: {exc.strerror or exc}): "
                         "pick a folder this user can write\n")
        sys.exit(1)
    finally:
        for made in missing:  # deepest first
            try:
                made.rmdir()
            except OSError:
                pass
