"""Typed config sections. Each rule's slice of `config.yaml` arrives as a plain dict and becomes one of these.

`Section.from_dict(data, key)` rejects unknown keys, missing required fields and wrong types, and every
error names the full config key (e.g. ``features.batch_size``), so a notebook user gets the same one-line
message as the workflow's schema validation.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Self

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Section:
    """Base of all config sections: construction from dicts with key-naming errors."""

    key: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, key: str | None = None) -> Self:
        key = key or cls.key
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        for unknown in sorted(set(data) - names):
            raise ConfigError(f"{_join(key, unknown)}: unknown key")
        values = {}
        for field in dataclasses.fields(cls):
            name = _join(key, field.name)
            if field.name not in data:
                if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                    raise ConfigError(f"{name}: required key is missing")
                continue
            values[field.name] = _coerce(data[field.name], hints[field.name], name)
        section = cls(**values)
        section.check(key)
        return section

    def check(self, key: str) -> None:
        """Range checks beyond types; raise ConfigError naming `key.field`."""

    def to_dict(self) -> dict[str, Any]:
        """The section as plain data that `from_dict` reads back (nested sections by their own `to_dict`)."""
        return {field.name: _plain(getattr(self, field.name)) for field in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def require(condition: bool, key: str, field: str, message: str) -> None:
    """Raise ConfigError(`key.field: message`) unless `condition`."""
    if not condition:
        raise ConfigError(f"{_join(key, field)}: {message}")


def _join(key: str, field: str) -> str:
    return f"{key}.{field}" if key else field


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} has the wrong type")
    if isinstance(hint, type) and issubclass(hint, Section):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        return hint.from_dict(value, name)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        return {k: _coerce(v, args[1], f"{name}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{name}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value
