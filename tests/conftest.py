"""Shared fixtures: Hydra configs composed in-process, and a reference MoE written as loops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A few CPU steps through every stage: the default ViT, and a tiny byte-level LM.
VIT_FAST = ["debug=default", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "callbacks.progress=null"]
LM_FAST = [*VIT_FAST, "experiment=lm_pystdlib", "data.seq_len=32", "data.batch_size=4", "data.max_bytes=200000",
           "model.d_model=32", "model.ffn_hidden=64", "model.depth=2", "model.num_heads=2", "task.sample_tokens=0"]


def one_line_error(cfg: DictConfig) -> str:
    """Run `cfg` expecting moelab's one-line refusal; returns the line."""
    from moelab.run.train import run

    with pytest.raises(SystemExit) as info:
        run(cfg)
    line = str(info.value)
    assert "\n" not in line and line.startswith("moelab: error: "), line
    return line


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


def _trained(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    from moelab.run.train import run

    folder = tmp_path_factory.mktemp(name)
    run(compose_config(folder, *overrides))
    return folder


@pytest.fixture(scope="session")
def trained_vit(tmp_path_factory) -> Path:
    """The run folder of a few VIT_FAST steps, trained once for every test that only reads it."""
    return _trained(tmp_path_factory, "trained_vit", VIT_FAST)


@pytest.fixture(scope="session")
def trained_lm(tmp_path_factory) -> Path:
    """The run folder of a few LM_FAST steps, trained once for every test that only reads it."""
    return _trained(tmp_path_factory, "trained_lm", LM_FAST)
