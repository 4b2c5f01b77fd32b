"""Type checks for decoded control messages: every field against its dataclass annotation.

JSON gives a message's fields whatever types the sender chose; `check_fields` accepts a decoded
body only when every value matches the annotation of its field (`int`, `float`, `str`, `bool`,
`None`, unions of them, `list[...]`, `dict[str, ...]`, `Any`), so a wrong type is a one-line
`ProtocolError` at the door instead of a `TypeError` deep in the coordinator. Rules: a bool is
never an int or a float (JSON keeps them apart, Python does not); an int is a float and is
converted (`1` for `1.0`); floats must be finite (the decoder also refuses NaN and Infinity).
"""

from __future__ import annotations

import math
import types
import typing
from functools import cache
from typing import Any, Union

from hetero_testnet.errors import ProtocolError

MAX_DEPTH = 8
"""Deeper nesting than this is refused (no message of ours nests past 3)."""


@cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a message class's fields (ClassVars excluded)."""
    hints = typing.get_type_hints(cls)
    return {name: hint for name, hint in hints.items() if typing.get_origin(hint) is not typing.ClassVar}


def conforms(value: Any, hint: Any, depth: int = 0) -> bool:
    """Whether a JSON-decoded `value` is of type `hint` (module docstring for the rules)."""
    if depth > MAX_DEPTH:
        return False
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(conforms(value, a, depth) for a in args)
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        item = args[0] if args else Any
        return isinstance(value, list) and all(conforms(v, item, depth + 1) for v in value)
    if origin is dict:
        key, item = args if args else (str, Any)
        return isinstance(value, dict) and all(conforms(k, key, depth + 1) and conforms(v, item, depth + 1)
                                               for k, v in value.items())
    return False


def _wants_float(hint: Any) -> bool:
    return hint is float or float in typing.get_args(hint)


def check_fields(cls: type, body: dict[str, Any]) -> dict[str, Any]:
    """`body` with ints widened to floats where a float is declared; ProtocolError naming the first
    field whose value has the wrong type. Missing and unknown fields are the caller's check."""
    hints = field_types(cls)
    out = dict(body)
    for name, value in body.items():
        hint = hints.get(name, Any)
        if not conforms(value, hint):
            raise ProtocolError(f"field {name!r} of a {getattr(cls, 'type', cls.__name__)} message must be "
                                f"{_describe(hint)} (got {type(value).__name__})")
        if _wants_float(hint) and isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _describe(hint: Any) -> str:
    text = hint.__name__ if isinstance(hint, type) else str(hint)
    return text.replace("typing.", "").replace("NoneType", "None")


def reject_constant(name: str) -> None:
    """`json.loads(parse_constant=...)`: NaN and +-Infinity are not JSON and never accepted."""
    raise ProtocolError(f"malformed message: {name} is not a JSON number")
