"""Classify images with a trained model: `python predict.py <checkpoint> images=<folder or file>`.

One line per image on stdout: file, class, probability, and per MoE layer the experts its
patches went to (share of the image's tokens); `out=preds.csv` or `.json` writes them too."""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from moelab.run.cli import check_overrides, prepare, require, show_help
from moelab.run.errors import one_line_errors

USAGE = """moelab predict: a trained image classifier's class for each image, and the experts its patches went to

Usage: python predict.py <checkpoint> images=<folder or image file> [out=preds.csv|preds.json] [top_experts=3] [batch_size=64]
       (the checkpoint also as ckpt_path=<checkpoint>)

  images         a folder (its image files, not recursive) or one image file
  out            also write the predictions to a .csv or .json file
  top_experts    experts listed per MoE layer and image
  --verbose      show third-party warnings moelab filters

Prints one tab-separated line per image: file, class, probability, experts per MoE layer.
Example:
  python predict.py outputs/runs/<run>/checkpoints/last.ckpt images=my_digits/ out=preds.csv"""


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from moelab.use.predict import main_predict

    with one_line_errors():
        main_predict(OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    show_help(sys.argv[1:], USAGE)
    sys.argv[1:] = prepare(sys.argv[1:], checkpoint=True)
    require(("ckpt_path", "images"), sys.argv[1:], "python predict.py <checkpoint> images=<folder or image>")
    check_overrides(sys.argv[1:], "predict")
    main()
