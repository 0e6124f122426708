"""Text from a trained language model: `python generate.py ckpt_path=<checkpoint> prompt="def "
max_new_tokens=200 temperature=0.8 top_k=50` (temperature=0: greedy). The text streams to
stdout; which experts each MoE layer gave the generated tokens goes to stderr at the end.

`prompt=` is taken verbatim from the command line (spaces and all), not parsed by Hydra."""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from moelab.run.cli import require, take_verbatim
from moelab.run.errors import one_line_errors

PROMPT: list[str] = []


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    from moelab.use.generate import main_generate

    with one_line_errors():
        main_generate(OmegaConf.to_container(cfg, resolve=True), PROMPT[0] if PROMPT else cfg.prompt)


if __name__ == "__main__":
    require(("ckpt_path",), sys.argv[1:], "python generate.py ckpt_path=<checkpoint> prompt=\"def \" [max_new_tokens=200 temperature=0.8 top_k=50]")
    PROMPT[:], sys.argv[1:] = take_verbatim("prompt", sys.argv[1:])
    main()
