"""Classify images with a trained model: `python predict.py ckpt_path=<checkpoint> images=<folder or file>`.

One line per image on stdout: file, class, probability, and per MoE layer the experts its
patches went to (share of the image's tokens)."""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from moelab.run.cli import require
from moelab.run.errors import one_line_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from moelab.use.predict import main_predict

    with one_line_errors():
        main_predict(OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    require(("ckpt_path", "images"), sys.argv[1:], "python predict.py ckpt_path=<checkpoint> images=<folder or image>")
    main()
