"""Each setting of a config group against the type its class takes, before anything is built:
`router.k=1.5` or `data.batch_size=abc` is one line naming the setting, not a traceback from
deep inside torch. The types are the classes' own annotations (int, float, bool, or one of
them or None); settings of other types (lists, strings, callables, unions of those) are left
to the class."""

from __future__ import annotations

import functools
import types
import typing
from typing import Any, Mapping

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from moelab.moe.errors import ConfigError

CHECKED = {int, float, bool, type(None)}
GROUPS = ("model", "router", "expert", "data", "task", "trainer")


@functools.cache
def _annotations(target: str) -> dict[str, Any]:
    """Parameter annotations of `target`'s constructor, base classes' too (a `**kwargs`
    passes settings on to them); {} if it cannot be looked up."""
    try:
        obj = get_object(target)
    except Exception:  # noqa: BLE001 - instantiate will report an unknown target itself
        return {}
    found: dict[str, Any] = {}
    for cls in getattr(obj, "__mro__", (obj,)):
        init = cls.__init__ if isinstance(cls, type) else cls
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # noqa: BLE001 - an annotation that does not resolve: skip that class
            continue
        for name, hint in hints.items():
            found.setdefault(name, hint)
    return found


def _basic_types(hint: Any) -> set[type] | None:
    """The types a hint allows if they are all in CHECKED (int | None → {int, NoneType}), else None."""
    if hint in CHECKED:
        return {hint}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_basic_types(arg) for arg in typing.get_args(hint)]
        if all(part is not None for part in parts):
            return set().union(*parts)
    return None


def _fits(value: Any, allowed: set[type]) -> bool:
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    if isinstance(value, float):
        return float in allowed
    return False


def _what(allowed: set[type]) -> str:
    kinds = [name for kind, name in ((bool, "true or false"), (int, "a whole number"), (float, "a number")) if kind in allowed]
    if int in allowed and float in allowed:
        kinds.remove("a whole number")
    return " or ".join(kinds) + (" (or null)" if type(None) in allowed else "")


def check_node(node: Mapping[str, Any], where: str) -> None:
    """Every setting of one `_target_` config against its class's annotations."""
    target = node.get("_target_")
    if not target:
        return
    hints = _annotations(str(target))
    for key, value in node.items():
        if str(key).startswith("_") or key not in hints:
            continue
        allowed = _basic_types(hints[key])
        if allowed is not None and not _fits(value, allowed):
            raise ConfigError(f"{where}.{key}={value!r} must be {_what(allowed)} "
                              f"(the {key} of {str(target).rsplit('.', 1)[-1]})")


def check_setting_types(cfg: DictConfig) -> None:
    """Every group's settings (and the trainer's strategy, callbacks and loggers) against
    their classes' annotations, values resolved as the run would see them."""
    for group in GROUPS:
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            check_node(OmegaConf.to_container(node, resolve=True), group)
    strategy = cfg.get("trainer", {}).get("strategy")
    if isinstance(strategy, DictConfig):
        check_node(OmegaConf.to_container(strategy, resolve=True), "trainer.strategy")
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            if isinstance(node, DictConfig):
                check_node(OmegaConf.to_container(node, resolve=True), f"{group}.{name}")
