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


_KINDS = {int: "an int", float: "a float", str: "a str", bool: "a bool (True or False)"}


def got(value: Any) -> str:
    """``value`` and its type, as error messages show them: ``2.5 (float)``."""
    return f"{value!r} ({type(value).__name__})"


def wrong_type(where: str, name: str, value: Any, expected: str, fix: str = "") -> None:
    """Raises the ``ValueError`` for a field of the wrong type."""
    raise ValueError(f"{where}.{name} must be {expected}; got {got(value)}{fix}")


def check_type(where: str, name: str, value: Any, hint: Any) -> None:
    """Raises ``ValueError`` unless ``value`` fits the field's annotation ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_ = f"; did you mean {close[0]!r}?" if close else ""
            wrong_type(where, name, value, f"one of {list(args)}", hint_)
        return
    optional = False
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        optional = type(None) in args
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple:
        ok = isinstance(value, tuple) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in value
        )
        if not ok:
            wrong_type(where, name, value, "a tuple of ints")
        return
    if isinstance(hint, type) and hasattr(hint, "validate"):  # a settings group
        if not isinstance(value, hint):
            _wrong_group(where, name, value, hint, optional)
        return
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return  # ints are fine where floats are expected
    if (isinstance(value, bool) and hint is not bool) or not isinstance(value, hint):
        wrong_type(where, name, value, _KINDS[hint])


def _wrong_group(where: str, name: str, value: Any, group: type, optional: bool) -> None:
    expected = f"an hj.{group.__name__}" + (" or None (off)" if optional else "")
    fix = ""
    if isinstance(value, dict):
        fix = (
            f"; build it with hj.{group.__name__}(...), or read a whole config from "
            "nested dicts with hj.HybridConfig.from_dict"
        )
    wrong_type(where, name, value, expected, fix)


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
