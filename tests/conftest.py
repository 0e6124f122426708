"""Shared fixtures: Hydra configs composed in-process, and a reference MoE written as loops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_config(output_dir: Path, *overrides: str) -> DictConfig:
    """The config `python train.py <overrides>` would run, writing into output_dir."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides: str) -> DictConfig:
        return compose_config(tmp_path, *overrides)

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
