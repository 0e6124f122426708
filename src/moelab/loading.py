"""Models from checkpoints: the composed config a checkpoint carries builds the model, and
its weights fill it (weights_only loading, one-line errors)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from omegaconf import OmegaConf
from torch import nn

from moelab.checkpoints import read_model_state
from moelab.moe.errors import ConfigError


def load_model(path: str, key: str = "teacher") -> nn.Module:
    """The model a moelab checkpoint (one file or a sharded folder) holds, in eval mode."""
    weights, config = read_model_state(path, key)
    return model_from_state(weights, config, key, path)


def model_from_state(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None, key: str, path: str) -> nn.Module:
    """The model `config` describes, holding `weights`, in eval mode."""
    from moelab.train import build_model  # moelab.train imports moelab.checkpoints: import late

    if config is None:
        raise ConfigError(f"{key}={path} carries no run config: use a checkpoint written by moelab's train.py")
    model = build_model(OmegaConf.create(dict(config)))
    model.load_state_dict(weights)
    return model.eval()
