"""What the entry points beside train.py share: configuration mistakes end in one line."""

from __future__ import annotations

import sys
from contextlib import contextmanager


@contextmanager
def one_line_errors():
    """A ConfigError (or Lightning's MisconfigurationException) anywhere in the `raise ... from`
    chain ends the program with `moelab: error: <its first line>` and exit 1, no traceback
    (`MOELAB_DEBUG=1` keeps it); anything else propagates."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a configuration mistake
        from moelab.train import _first_line, _say, _user_error, debug_requested

        user_error = _user_error(exc)
        if user_error is None or debug_requested():
            raise
        _say(f"moelab: error: {_first_line(user_error)}")
        sys.exit(1)


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
