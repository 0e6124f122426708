"""The model a composed config describes: `model` instantiated with the `router`, `expert`
and `loss` groups as its MoE layers' factories. Runs build their model here, and so does
everything that rebuilds one from the config a checkpoint carries."""

from __future__ import annotations

import copy
import re
from typing import Any, Mapping

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from moelab.models import sizes  # noqa: F401 - the ${moelab.*:} resolvers that size the model
from moelab.moe.errors import ConfigError

# model.* settings of sparse upcycling: read by `init_from`, not passed to the model class.
UPCYCLE_KEYS = ("upcycle", "upcycle_noise", "upcycle_router_std")


def build_model(config: DictConfig | Mapping[str, Any]) -> nn.Module:
    """The model of a composed config (`model`, `router`, `expert`, `loss`): a run's, or the
    plain one a checkpoint carries."""
    cfg = config if isinstance(config, DictConfig) else OmegaConf.create(dict(config))
    model_cfg = cfg.model
    if any(key in model_cfg for key in UPCYCLE_KEYS):  # used by init_from, not by the model
        model_cfg = copy.deepcopy(model_cfg)
        with open_dict(model_cfg):
            for key in UPCYCLE_KEYS:
                model_cfg.pop(key, None)
    try:
        return instantiate(
            model_cfg,
            router=cfg.router,
            expert=cfg.expert,
            aux_loss_weights=OmegaConf.to_container(cfg.loss, resolve=True) if cfg.loss else {},
            _convert_="all",
        )
    except Exception as exc:
        error = unknown_setting(cfg, exc)
        if error is None:
            raise
        raise error from None


def unknown_setting(cfg: DictConfig, exc: BaseException | None) -> ConfigError | None:
    """A router or expert setting its class does not take (`+router.token_mask=...` on a
    router without a mask) as one line, instead of Hydra's wrapped TypeError."""
    while exc is not None:
        found = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(exc))
        if isinstance(exc, TypeError) and found:
            cls, key = found.groups()
            for group in ("router", "expert"):
                node = cfg.get(group)
                if node is not None and str(node.get("_target_", "")).endswith(f".{cls}") and key in node:
                    return ConfigError(f"{group}.{key} is not a setting of {cls}: drop it, or pick a {group} that "
                                       f"has it (conf/{group}/)")
            return None
        exc = exc.__cause__
    return None
