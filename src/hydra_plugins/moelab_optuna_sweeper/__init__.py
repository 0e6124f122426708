"""`hparams_search=optuna`'s sweeper: hydra-optuna-sweeper's own, ending in one line (after
writing the sweep summary) instead of a traceback when no trial completed, i.e. every trial
failed or returned no value. A Hydra plugin, so it lives in the `hydra_plugins` namespace;
without the `sweep` extra it defines nothing (Hydra scans this package on every start)."""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None:
    from pathlib import Path
    from typing import Any

    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _OptunaSweeper
    from omegaconf import DictConfig

    class OptunaSweeper(_OptunaSweeper):
        def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
            self._sweep_dir = Path(str(config.hydra.sweep.dir))
            super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

        def sweep(self, arguments: list[str]) -> None:
            try:
                return super().sweep(arguments)
            except ValueError as exc:
                if "No trials are completed" not in str(exc):
                    raise
            from moelab.sweeps.summary import write_summary  # the jobs' own records say why

            if self._sweep_dir.is_dir():
                write_summary(self._sweep_dir)
            raise SystemExit(
                f"moelab: error: no Optuna trial completed (each failed or returned no value): "
                f"see {self._sweep_dir}/summary.md"
            )
