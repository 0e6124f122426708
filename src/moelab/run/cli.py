"""What the entry points (train.py, eval.py, predict.py, generate.py) share on their command
line before Hydra sees it: mandatory keys, free text taken verbatim, missing plugins. Light:
no torch."""

from __future__ import annotations

import sys


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
