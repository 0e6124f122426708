"""What a factory (`functools.partial`, a Hydra `_partial_` config) will be called with: the
values it binds, and the keywords it accepts. MoE layers read their router and experts
factories this way before building them."""

from __future__ import annotations

import inspect
from typing import Callable, Mapping


def factory_keyword(factory: Callable[..., object], name: str) -> object | None:
    """The value a factory will pass for `name`: its bound keyword, else its signature's
    default, else None."""
    keywords = getattr(factory, "keywords", None) or {}
    if name in keywords:
        return keywords[name]
    try:
        parameter = inspect.signature(factory).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def factory_k(factory: Callable[..., object]) -> int | None:
    """The k a router factory will use."""
    return factory_keyword(factory, "k")


def accepted_keywords(factory: Callable[..., object], facts: Mapping[str, object]) -> dict[str, object]:
    """Those `facts` (not None) that `factory` takes as keyword arguments."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return {name: value for name, value in facts.items() if value is not None}
    return {name: value for name, value in facts.items() if value is not None and name in parameters}
