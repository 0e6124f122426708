"""Quiet by default: third-party lines that say nothing about the run (Lightning's product
tips, a deprecation inside Lightning's own pytree code repeated at every fit and test and
on every rank, TensorBoard's directory watcher) are filtered at their source. `--verbose`
(MOELAB_VERBOSE=1), `hydra.verbose=true` or `MOELAB_DEBUG=1` shows them. Light: no torch."""

from __future__ import annotations

import logging
import os
import warnings

# Messages of other libraries that are not about this run, by logger (None: a warning).
NOISE: tuple[tuple[str | None, str], ...] = (
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip:"),  # litlogger / litmodels adverts
    (None, r".*isinstance\(treespec, LeafSpec\)` is deprecated"),  # lightning's _pytree vs torch's
)
QUIET_LOGGERS = ("tensorboard", "tensorboard.backend.event_processing.directory_watcher")


class _Drop(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_third_party(verbose: bool = False) -> None:
    """Install the filters (idempotent); nothing with `verbose` or MOELAB_VERBOSE=1."""
    if verbose or os.environ.get("MOELAB_VERBOSE", "") not in ("", "0"):
        return
    for logger_name, text in NOISE:
        if logger_name is None:
            warnings.filterwarnings("ignore", message=text)
            continue
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _Drop) and f.prefix == text for f in logger.filters):
            logger.addFilter(_Drop(text))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
