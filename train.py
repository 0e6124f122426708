"""Train a MoE model: `python train.py [group=option ...] [key=value ...]` (Hydra)."""

import sys

import hydra
from omegaconf import DictConfig

import moelab.run.resolvers  # noqa: F401 - registers the ${moelab.*:} resolvers before Hydra resolves anything (light: no torch)
from moelab.run.cli import check_overrides, check_plugins, check_run_folder, prepare


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from moelab.run.train import (
        run,  # imported here so `--help` and tab completion stay fast
    )

    return run(cfg)


if __name__ == "__main__":
    sys.argv[1:] = prepare(sys.argv[1:])  # --verbose, ~ and $VAR in paths
    check_plugins(sys.argv[1:])
    check_overrides(sys.argv[1:], "train")  # typos: one line with the closest name
    check_run_folder(sys.argv[1:])
    main()
