"""Models from checkpoints: the composed config a checkpoint carries builds the model, and
its weights fill it (weights_only loading, one-line errors)."""

from __future__ import annotations

from omegaconf import OmegaConf
from torch import nn

from moelab.checkpoints import CONFIG_KEY, model_weights_of, read_checkpoint
from moelab.moe.errors import ConfigError


def load_model(path: str, key: str = "teacher") -> nn.Module:
    """The model a moelab checkpoint (single file) holds, in eval mode."""
    from moelab.train import build_model  # moelab.train imports moelab.checkpoints: import late

    checkpoint = read_checkpoint(path, key)
    config = checkpoint.get(CONFIG_KEY)
    if config is None:
        raise ConfigError(f"{key}={path} carries no run config: use a checkpoint written by moelab's train.py")
    model = build_model(OmegaConf.create(config))
    model.load_state_dict(model_weights_of(checkpoint, path, key))
    return model.eval()
