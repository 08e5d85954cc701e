"""Strict dataclass configs: parsing from plain dicts (YAML/JSON) with errors that name values.

Every config section in moe_dist is a dataclass built through `from_dict`, which rejects unknown
keys (a typo in a config silently falling back to a default is the most expensive bug a training
run can have) and recurses into nested dataclass fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is unknown, missing or impossible."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass inside `tp`, including `X | None`; None when `tp` holds no dataclass."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys are errors naming the allowed ones."""
    where = where or cls.__name__
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} ({data!r})")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(types_)}")
    kwargs = {}
    for name, value in data.items():
        sub = _nested_dataclass(types_[name])
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def check(cond: bool, message: str) -> None:
    """Raise ConfigError(message) unless `cond`: keeps __post_init__ validation one line per rule."""
    if not cond:
        raise ConfigError(message)


def check_int(where: str, value: Any, minimum: int) -> None:
    """An integer (not a bool) >= `minimum`, else ConfigError naming `where` and the value."""
    check(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
          f"{where} must be an integer >= {minimum}, got {value!r}")


def check_choice(where: str, value: Any, choices: tuple) -> None:
    check(value in choices, f"{where} must be one of {list(choices)}, got {value!r}")
