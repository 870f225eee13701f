"""Checks and text formats behind ``hybrid_jax.config``: clear errors, TOML values."""

from __future__ import annotations

import difflib
import json
import math
import types
import typing
from typing import Any, Literal


def unknown(where: str, key: str, names: list[str], groups: dict[str, list[str]]) -> str:
    """The message for an unknown field: the closest valid name, or the group a flat
    name of an older version now lives in."""
    msg = f"{where}: unknown field {key!r}"
    prefix, _, rest = key.partition("_")
    if prefix in groups and rest in groups[prefix]:
        return f"{msg}; it is now {prefix}=hj.{groups[prefix][-1]}({rest}=...)"
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    return f"{msg}{hint} Valid fields: {', '.join(names)}"


def require(where: str, name: str, value: Any, ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(f"{where}.{name} {why}; got {value!r}")


def positive(where: str, name: str, value: float) -> None:
    require(where, name, value, math.isfinite(value) and value > 0, "must be finite and > 0")


def unit(where: str, name: str, value: float, closed_top: bool = False) -> None:
    top_ok = value <= 1.0 if closed_top else value < 1.0
    interval = "[0, 1]" if closed_top else "[0, 1)"
    ok = math.isfinite(value) and value >= 0.0 and top_ok
    require(where, name, value, ok, f"must be in {interval}")


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def check_type(where: str, name: str, value: Any, hint: Any) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        require(where, name, value, value in args, f"must be one of {list(args)}")
        return
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple:
        ok = isinstance(value, tuple) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in value
        )
        require(where, name, value, ok, "must be a tuple of integers")
        return
    if isinstance(hint, type) and hasattr(hint, "validate"):  # a settings group
        require(where, name, value, isinstance(value, hint), f"must be a hj.{hint.__name__}")
        return
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return  # ints are fine where floats are expected
    if (isinstance(value, bool) and hint is not bool) or not isinstance(value, hint):
        require(where, name, value, False, f"must be {_KINDS[hint]}")


def plain(x: Any) -> Any:
    return list(x) if isinstance(x, tuple) else x


def toml_value(x: Any) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, (int, float)):
        return repr(x)
    if isinstance(x, str):
        return json.dumps(x)
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(toml_value(e) for e in x) + "]"
    raise TypeError(f"cannot write {type(x).__name__} as TOML")
