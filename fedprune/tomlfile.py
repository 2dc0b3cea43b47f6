"""What the TOML files (the task file, the agent's config) share: reading one, checking each
value against the type of its dataclass field, with errors that name the key, and writing one
(for scripts that hand a task to ``fedprune-simulate``)."""

from __future__ import annotations

import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin


def read_toml(path: str | Path, kind: str, error: type[Exception]) -> dict[str, Any]:
    """The parsed file; ``error`` (naming the ``kind`` of file and the path) if it cannot be read."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{kind} not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {kind} {p}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{p}: not valid TOML: {e}") from None


def coerce(value: Any, tp: Any, key: str, error: type[Exception]) -> Any:
    """``value`` as the field type ``tp`` (``Literal``, ``bool``, ``int``, ``float``, ``str``,
    ``dict``, ``tuple`` of strings or of fixed length, or ``X | None`` where leaving the key out
    means None)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [t for t in get_args(tp) if t is not type(None)]
        if len(options) != 1:
            raise error(f"{key}: unsupported type {tp}")  # pragma: no cover - no such fields
        return coerce(value, options[0], key, error)
    if origin is Literal:
        if value not in get_args(tp):
            raise error(f"{key} must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise error(f"{key} must be a table, got {value!r}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if args[1:] == (Ellipsis,) and args[0] is str:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise error(f"{key} must be a list of strings, got {value!r}")
            return tuple(value)
        if not isinstance(value, list) or len(value) != len(args):
            raise error(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, t, key, error) for v, t in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise error(f"{key} must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise error(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{key} must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise error(f"{key} must be a string, got {value!r}")
        return value
    raise error(f"{key}: unsupported type {tp}")  # pragma: no cover


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"no TOML for {value!r}")


def toml_text(raw: dict[str, Any]) -> str:
    """``raw`` (a task as ``dataclasses.asdict`` or ``tomllib`` gives it: scalars, lists, tables, arrays
    of tables) as TOML text; keys whose value is None are left out (TOML has no null)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in raw.items() if not isinstance(v, dict) and v is not None]
    for section, table in raw.items():
        if not isinstance(table, dict):
            continue
        lines.append(f"[{section}]")
        tables = {k: v for k, v in table.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if k not in tables and v is not None]
        for k, items in tables.items():
            for item in items:
                lines.append(f"[[{section}.{k}]]")
                lines += [f"{ik} = {_toml_value(iv)}" for ik, iv in item.items() if iv is not None]
    return "\n".join(lines) + "\n"
