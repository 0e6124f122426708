"""Text from a trained language model: `python generate.py <checkpoint> prompt="def "
max_new_tokens=200 temperature=0.8 top_k=50 top_p=0.9` (temperature=0: greedy). The text
streams to stdout; which experts each MoE layer gave the generated tokens goes to stderr at
the end.

`prompt=` is taken verbatim from the command line (spaces and all), not parsed by Hydra."""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from moelab.run.cli import check_overrides, prepare, require, show_help, take_verbatim
from moelab.run.errors import one_line_errors

PROMPT: list[str] = []
USAGE = """moelab generate: text from a trained language model, and the experts that wrote it

Usage: python generate.py <checkpoint> prompt="def " [max_new_tokens=200] [temperature=0.8] [top_k=50] [top_p=0.9]
                          [seed=0] [device=auto|cpu|cuda]          (the checkpoint also as ckpt_path=<checkpoint>)

  prompt         the text to continue, taken verbatim (spaces and all); empty: start from end-of-text
  temperature    0: greedy (deterministic); otherwise sampling, fixed by seed
  top_k, top_p   keep the k likeliest tokens / the likeliest whose probabilities reach p (null: no cut)
  --verbose      show third-party warnings moelab filters

The text streams to stdout; the experts each MoE layer gave the generated tokens go to stderr.
Example:
  python generate.py outputs/runs/<run>/checkpoints/last.ckpt prompt="def " temperature=0"""


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    from moelab.use.generate import main_generate

    with one_line_errors():
        main_generate(OmegaConf.to_container(cfg, resolve=True), PROMPT[0] if PROMPT else cfg.prompt)


if __name__ == "__main__":
    show_help(sys.argv[1:], USAGE)
    PROMPT[:], sys.argv[1:] = take_verbatim("prompt", sys.argv[1:])
    sys.argv[1:] = prepare(sys.argv[1:], checkpoint=True)
    require(("ckpt_path",), sys.argv[1:], "python generate.py <checkpoint> prompt=\"def \" [max_new_tokens=200 temperature=0.8 top_k=50]")
    check_overrides(sys.argv[1:], "generate")
    main()
