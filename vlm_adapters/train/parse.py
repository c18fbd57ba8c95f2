"""Recipe parsing helpers: dotted overrides, typed dataclass parsing, checks with suggestions.

PyYAML reads `1e-4` as a string (YAML 1.1 wants `1.0e-4`), so values are coerced to the field's
annotated type; an unknown key names the closest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from typing import Any

from ..config import registered_methods
from ..errors import AdapterError, shorten
from ..readers import load_yaml


def apply_overrides(data: dict, overrides) -> dict:
    """Set dotted keys (`train.lr=1e-4`, `adapters.0.hidden_size=64`); values are parsed as YAML."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise AdapterError(f"--set {shorten(item)}: use --set key=value, e.g. --set train.lr=1e-4")
        value = load_yaml(raw, f"--set {shorten(item)}: the value") if raw.strip() else ""
        parts = key.strip().split(".")
        node = data
        for depth, part in enumerate(parts):
            here = ".".join(parts[:depth]) or "the recipe"
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise AdapterError(f"--set {key}: {here} is a list of {len(node)}; "
                                       f"use an index 0..{len(node) - 1}, e.g. {here}.0")
                part = int(part)
            elif not isinstance(node, dict):
                raise AdapterError(f"--set {key}: {here} is a value ({shorten(node)}), not a section")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return data


def parse(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise AdapterError(f"{where or 'the recipe'} must be a mapping, got {shorten(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise AdapterError(_unknown(key, fields, where))
    return cls(**{k: _coerce(hints[k], v, _join(where, k)) for k, v in data.items()})


def _coerce(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise AdapterError(f"{where}: expected a list, got {shorten(value)}")
        return [_coerce(args[0], v, f"{where}.{i}") if args else v for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise AdapterError(f"{where}: expected a mapping, got {shorten(value)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise AdapterError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {shorten(value)}")


def coerce_adapter(raw: dict, where: str) -> dict:
    """Coerce an adapter entry's values to its config's field types, leaving unknown keys to
    config_from_dict (which names the closest valid one)."""
    method = registered_methods().get(raw.get("method"))
    if method is None:
        return dict(raw)
    hints = typing.get_type_hints(method.config_cls)
    names = {f.name for f in dataclasses.fields(method.config_cls)}
    return {k: (_coerce(hints[k], v, f"{where}.{k}") if k in names else v) for k, v in raw.items()}


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def _unknown(key, valid, where: str) -> str:
    hint = difflib.get_close_matches(str(key), list(valid), n=1)
    did = f"; did you mean {shorten(_join(where, hint[0]))}?" if hint else f"; valid keys: {sorted(valid)}"
    return f"unknown key {shorten(_join(where, key))}{did}"


def check_choice(value, choices, where: str) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        did = f" (did you mean {shorten(hint[0])}?)" if hint else ""
        raise AdapterError(f"{where}={shorten(value)}{did}; choose one of {', '.join(choices)}")


def require(value, where: str, what: str) -> None:
    if not value:
        raise AdapterError(f"{where} is required: {what}")


def check(ok: bool, where: str, expected: str, value) -> None:
    if not ok:
        raise AdapterError(f"{where} must be {expected}, got {shorten(value)}")
