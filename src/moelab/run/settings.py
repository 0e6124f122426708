"""Each setting of a config group against the type its class takes, before anything is built:
`router.k=1.5` or `data.batch_size=abc` is one line naming the setting, not a traceback from
deep inside torch. The types are the classes' own annotations (int, float, bool, or one of
them or None); settings of other types (lists, strings, callables, unions of those) are left
to the class."""

from __future__ import annotations

import difflib
import functools
import inspect
import types
import typing
from typing import Any, Mapping

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from moelab.moe.errors import ConfigError

CHECKED = {int, float, bool, type(None)}
GROUPS = ("model", "router", "expert", "data", "task", "trainer")
# Groups whose every key goes to the class (the model group also holds keys build_model reads).
KEYS_CHECKED = ("data", "trainer")


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


@functools.cache
def _parameters(target: str) -> frozenset[str] | None:
    """Every keyword `target`'s constructor takes, following `**kwargs` to the base classes;
    None if some `**kwargs` goes where the names cannot be read (then nothing is refused)."""
    try:
        obj = get_object(target)
    except Exception:  # noqa: BLE001 - instantiate will report an unknown target itself
        return None
    names: set[str] = set()
    for cls in getattr(obj, "__mro__", (obj,)):
        if cls is object:
            return None
        try:
            parameters = inspect.signature(cls.__init__ if isinstance(cls, type) else cls).parameters.values()
        except (TypeError, ValueError):
            return None
        names.update(p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            return frozenset(names - {"self"})
    return None


def suggestion(word: str, options: typing.Iterable[str]) -> str:
    """"; did you mean X?" for the closest of `options`, or ""."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def check_known_keys(node: Mapping[str, Any], where: str) -> None:
    """Every key of a `_target_` config is a parameter of its class: `++trainer.max_stepz=5`
    is one line at composition, not a TypeError from inside the Trainer after start-up."""
    target = node.get("_target_")
    known = _parameters(str(target)) if target else None
    if known is None:
        return
    for key in node:
        if not str(key).startswith("_") and key not in known:
            name = str(target).rsplit(".", 1)[-1]
            raise ConfigError(f"{where}.{key} is not a setting of {name}{suggestion(str(key), known)}")


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
            if group in KEYS_CHECKED:
                check_known_keys(OmegaConf.to_container(node, resolve=True), group)
    strategy = cfg.get("trainer", {}).get("strategy")
    if isinstance(strategy, DictConfig):
        check_node(OmegaConf.to_container(strategy, resolve=True), "trainer.strategy")
        check_known_keys(OmegaConf.to_container(strategy, resolve=True), "trainer.strategy")
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            if isinstance(node, DictConfig):
                check_node(OmegaConf.to_container(node, resolve=True), f"{group}.{name}")
