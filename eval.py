"""Evaluate a trained checkpoint: `python eval.py ckpt_path=<checkpoint> [split=val] [data.key=value ...]`.

The model, data and settings come from the checkpoint's own config; `data.*`, `data=<option>`,
`task.*` and `trainer.*` on the command line change them (see moelab.use.evaluate)."""

import sys

import hydra
from omegaconf import DictConfig

import moelab.run.resolvers  # noqa: F401 - registers the ${moelab.*:} resolvers (light: no torch)
from moelab.run.cli import check_run_folder, require
from moelab.run.errors import one_line_errors

RUN_OVERRIDES: list[str] = []


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from moelab.use.evaluate import evaluate

    with one_line_errors(run_folder=cfg.paths.output_dir):
        evaluate(cfg, RUN_OVERRIDES)


if __name__ == "__main__":
    require(("ckpt_path",), sys.argv[1:], "python eval.py ckpt_path=<checkpoint> [split=val] [data.<key>=...]")
    check_run_folder(sys.argv[1:])
    with one_line_errors():
        from moelab.use.evaluate import split_run_overrides

        RUN_OVERRIDES[:], sys.argv[1:] = split_run_overrides(sys.argv[1:])
    main()
