"""Evaluate a trained checkpoint: `python eval.py ckpt_path=<checkpoint> [split=val] [data.key=value ...]`.

The model, data and settings come from the checkpoint's own config; `data.*`, `data=<option>`,
`task.*` and `trainer.*` on the command line change them (see moelab.evaluate)."""

import sys

import hydra
from omegaconf import DictConfig

import moelab.sweep  # noqa: F401 - registers ${moelab.run_version:} (light: no torch)
from moelab.cli import one_line_errors, require

RUN_OVERRIDES: list[str] = []


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from moelab.evaluate import evaluate

    with one_line_errors(run_folder=cfg.paths.output_dir):
        evaluate(cfg, RUN_OVERRIDES)


if __name__ == "__main__":
    require(("ckpt_path",), sys.argv[1:], "python eval.py ckpt_path=<checkpoint> [split=val] [data.<key>=...]")
    with one_line_errors():
        from moelab.evaluate import split_run_overrides

        RUN_OVERRIDES[:], sys.argv[1:] = split_run_overrides(sys.argv[1:])
    main()
