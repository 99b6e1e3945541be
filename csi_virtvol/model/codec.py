"""Plain-dict encoding of the model, for state stores and CRD bodies.

One generic encoder walks the frozen dataclasses by their type hints, so a new
field needs no codec change.  Enums are stored by value, Flags as name lists.
"""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def to_dict(obj: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"not a dataclass instance: {obj!r}")
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        out[f.name] = _encode(getattr(obj, f.name))
    return out


def _encode(v: Any) -> Any:
    if isinstance(v, enum.Flag):
        return [m.name.lower() for m in type(v) if m.value and m.name and m in v]
    if isinstance(v, enum.Enum):
        return v.value
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_dict(v)
    if isinstance(v, tuple | list):
        return [_encode(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _encode(x) for k, x in v.items()}
    return v


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            kwargs[f.name] = _decode(hints[f.name], data[f.name])
    return cls(**kwargs)


def _decode(tp: Any, v: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _decode(inner[0], v)
    if isinstance(tp, type) and issubclass(tp, enum.Flag):
        out = tp(0)
        for name in v:
            out |= tp[str(name).upper().replace("-", "_")]
        return out
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(v)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, v)
    if origin is tuple:
        return tuple(_decode(args[0], x) for x in v)
    if origin in (list,):
        return [_decode(args[0], x) for x in v]
    if origin in (Mapping, dict) or (origin is not None and origin.__name__ == "Mapping"):
        return {str(k): _decode(args[1], x) for k, x in v.items()}
    return v
