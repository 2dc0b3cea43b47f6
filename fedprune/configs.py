"""Config dicts of the pluggable parts (pruning rules, pruning schedules, aggregation strategies).

A pluggable part is a frozen dataclass with a class attribute that names it; its config is a plain
dict ``{kind: name, **parameters}`` (``{"rule": "absolute", "threshold": 0.4}``), the parameters
being the dataclass's init fields (a field with ``metadata={"config": False}`` is not one). One
strict parser serves every registry, so each names a bad, missing or unknown key the same way.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import MISSING, Field, fields
from typing import Any

__all__ = ["check_int", "check_real", "config_of", "config_parameters", "parse_config"]


def config_parameters(cls: type) -> dict[str, Field]:
    """The config parameters of the dataclass ``cls``: its init fields, less ``config=False`` ones."""
    return {f.name: f for f in fields(cls) if f.init and f.metadata.get("config", True)}


def config_of(kind: str, name: str, obj: Any) -> dict[str, Any]:
    """``{kind: name, **parameters}`` of the dataclass instance ``obj``."""
    return {kind: name, **{key: getattr(obj, key) for key in config_parameters(type(obj))}}


def parse_config(kind: str, registry: Mapping[str, type], d: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
    """The class ``d[kind]`` names in ``registry`` and the parameters to build it with.

    Raises ``ValueError`` naming the offending key: ``d`` not a mapping, a missing or unknown
    ``kind`` key, a parameter the class does not take, or a required parameter left out. Bad
    values are the class's own to refuse (its ``__post_init__``).
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"a {kind} config must be a mapping, got {type(d).__name__}")
    if kind not in d:
        raise ValueError(f"{kind} config has no {kind!r} key: {dict(d)!r}")
    name = d[kind]
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"unknown {kind!r} {name!r}; expected one of {sorted(registry)}")
    cls = registry[name]
    params = config_parameters(cls)
    extra = sorted(set(d) - {kind} - set(params))
    if extra:
        raise ValueError(
            f"unknown key {extra[0]!r} for {kind} {name!r}; it takes {sorted(params) or 'no keys'}"
        )
    missing = [
        key for key, f in params.items()
        if key not in d and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ValueError(f"{kind} {name!r} needs key {missing[0]!r}")
    return cls, {key: d[key] for key in params if key in d}


def check_real(name: str, value: Any) -> float:
    """``value`` as a float, or ``ValueError`` naming ``name`` if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def check_int(name: str, value: Any) -> int:
    """``value`` as an int, or ``ValueError`` naming ``name`` if it is not an integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)
