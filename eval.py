"""Evaluate a trained checkpoint: `python eval.py <checkpoint> [split=val] [data.key=value ...]`.

The model, data and settings come from the checkpoint's own config; `data.*`, `data=<option>`,
`task.*` and `trainer.*` on the command line change them (see moelab.use.evaluate)."""

import sys

import hydra
from omegaconf import DictConfig

import moelab.run.resolvers  # noqa: F401 - registers the ${moelab.*:} resolvers (light: no torch)
from moelab.run.cli import check_overrides, check_run_folder, prepare, require, show_help
from moelab.run.errors import one_line_errors

RUN_OVERRIDES: list[str] = []
USAGE = """moelab eval: a trained model's test (or validation) metrics, with the expert views of the evaluated data

Usage: python eval.py <checkpoint> [split=test|val] [data.<key>=... | data=<option> | task.<key>=... | trainer.<key>=...]
       (the checkpoint also as ckpt_path=<checkpoint>)

  <checkpoint>   a file written by train.py (last.ckpt, best-*.ckpt) or a sharded folder (trainer=fsdp/fsdp_ep)
  split          test (default) or val
  data.*, data=  the data to evaluate on (the model cannot change: its settings come from the checkpoint)
  task.*, trainer.*   evaluation settings, e.g. trainer.limit_test_batches=10
  --verbose      show third-party warnings moelab filters

Writes outputs/eval/<date_time>/: metrics.json and TensorBoard logs with the expert views.
Examples:
  python eval.py outputs/runs/<run>/checkpoints/last.ckpt
  python eval.py outputs/runs/<run>/checkpoints/last.ckpt split=val data.batch_size=256"""


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from moelab.use.evaluate import evaluate

    with one_line_errors(run_folder=cfg.paths.output_dir):
        evaluate(cfg, RUN_OVERRIDES)


if __name__ == "__main__":
    show_help(sys.argv[1:], USAGE)
    sys.argv[1:] = prepare(sys.argv[1:], checkpoint=True)
    require(("ckpt_path",), sys.argv[1:], "python eval.py <checkpoint> [split=val] [data.<key>=...]")
    check_run_folder(sys.argv[1:])
    with one_line_errors():
        from moelab.use.evaluate import split_run_overrides

        RUN_OVERRIDES[:], sys.argv[1:] = split_run_overrides(sys.argv[1:])
    check_overrides(sys.argv[1:], "eval")
    main()
