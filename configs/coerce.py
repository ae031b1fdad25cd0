"""Values from JSON and command-line text into the schema's field types.

Each field's type (configs/schema.py) says what it accepts: `Literal` choices, a `Range`,
`X | None`. Everything here is derived from those types and names the key it rejects.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from typing import Any

from configs.schema import Config, Range

# Text that sets an optional field back to None (its derived value).
_NONE_WORDS = ("none", "null", "auto")
_TRUE_WORDS = ("true", "1", "yes")
_FALSE_WORDS = ("false", "0", "no")


class ConfigError(ValueError):
    """A config key, value or combination of values is invalid."""


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready nested dict of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def to_json(config: Config) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)


def from_dict(data: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Build a config dataclass from a (possibly partial) nested dict, checking every key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls, include_extras=True)
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(_unknown_key_message(dotted))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a section (object), got {value!r}")
            values[key] = from_dict(value, hint, prefix=f"{dotted}.")
        else:
            values[key] = coerce(dotted, value, hint)
    return cls(**values)


def field_hints() -> dict[str, Any]:
    """Every leaf field's dotted key and its type hint, constraints (`Annotated`) included."""
    return dict(_leaf_hints(Config))


def choices(hint: Any) -> tuple[str, ...]:
    """The values a `Literal[...]` field allows; () for any other field."""
    hint = _strip_annotated(hint)
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()


def value_range(hint: Any) -> Range | None:
    """The `Range` on a field's type (through `X | None`), or None if it has none."""
    hint = _optional(hint) or hint
    if typing.get_origin(hint) is typing.Annotated:
        return next((m for m in hint.__metadata__ if isinstance(m, Range)), None)
    return None


def check_value(key: str, value: Any, hint: Any) -> None:
    """The checks a field's type carries: its Literal choices and its Range."""
    allowed = choices(hint)
    if allowed and value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
    bounds = value_range(hint)
    if bounds is not None and value not in bounds:
        raise ConfigError(f"{key} {bounds.error(value)}")


@functools.cache
def _leaf_hints(cls: type, prefix: str = "") -> tuple[tuple[str, Any], ...]:
    leaves: tuple[tuple[str, Any], ...] = ()
    hints = typing.get_type_hints(cls, include_extras=True)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            leaves += _leaf_hints(hint, f"{prefix}{field.name}.")
        else:
            leaves += ((f"{prefix}{field.name}", hint),)
    return leaves


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, list(field_hints()), n=1, cutoff=0.0)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def field_type(key: str) -> Any:
    """The type hint of a dotted leaf key; raises naming the closest valid key."""
    hints = field_hints()
    if key not in hints:
        raise ConfigError(_unknown_key_message(key))
    return hints[key]


def _optional(hint: Any) -> Any:
    """X for a hint `X | None`, else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return None


def _strip_annotated(hint: Any) -> Any:
    """X for a hint `Annotated[X, ...]`, else the hint itself."""
    return hint.__origin__ if typing.get_origin(hint) is typing.Annotated else hint


def parse_text(raw: str, hint: Any) -> Any:
    """Command-line text to a Python value; structured values are JSON."""
    inner = _optional(hint)
    if inner is not None:
        return None if raw.strip().lower() in _NONE_WORDS else parse_text(raw, inner)
    if typing.get_origin(hint) is tuple:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check (and from text, convert) a value to the field's type, naming the field on failure."""
    inner = _optional(hint)
    if inner is not None:
        return None if value is None else _coerce_optional(key, value, hint, inner)
    allowed = choices(hint)
    if allowed:
        check_value(key, value, hint)
        return value
    hint = _strip_annotated(hint)
    if typing.get_origin(hint) is tuple:
        pair = typing.get_args(typing.get_args(hint)[0])
        return _coerce_mixture(key, value) if pair[1] is float else _coerce_rules(key, value)
    try:
        return _SCALARS[hint](value)
    except (KeyError, ValueError):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}") from None


def _coerce_optional(key: str, value: Any, hint: Any, inner: Any) -> Any:
    try:
        return coerce(key, value, inner)
    except ConfigError:
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}") from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.lower() in _TRUE_WORDS
    raise ValueError(value)


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        return int(value)
    raise ValueError(value)


def _to_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    # Text such as "inf" or "nan" parses, but is never a setting anyone means.
    if isinstance(value, str) and math.isfinite(parsed := float(value)):
        return parsed
    raise ValueError(value)


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(value)


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _coerce_mixture(key: str, value: Any) -> tuple[tuple[str, float], ...]:
    message = f"{key}: expected a list of [path, weight] pairs, got {value!r}"
    if not isinstance(value, (list, tuple)):
        raise ConfigError(message)
    mixture = []
    for pair in value:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool)):
            raise ConfigError(message)
        if not pair[1] > 0:
            raise ConfigError(f"{key}: the weight of {pair[0]!r} must be positive, got {pair[1]}")
        mixture.append((pair[0], float(pair[1])))
    return tuple(mixture)


def _coerce_rules(key: str, value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    message = f"{key}: expected a list of [logical_name, [mesh_axis, ...]] pairs, got {value!r}"
    if not isinstance(value, (list, tuple)):
        raise ConfigError(message)
    rules = []
    for pair in value:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ConfigError(message)
        axes = pair[1]
        if isinstance(axes, str):
            axes = [axes]
        if axes is None:
            axes = []
        if not (isinstance(axes, (list, tuple)) and all(isinstance(a, str) for a in axes)):
            raise ConfigError(message)
        rules.append((pair[0], tuple(axes)))
    return tuple(rules)


def _type_name(hint: Any) -> str:
    inner = _optional(hint)
    if inner is not None:
        return f"{_type_name(inner)} or none"
    hint = _strip_annotated(hint)
    if choices(hint):
        return f"one of {', '.join(choices(hint))}"
    if isinstance(hint, type):
        return hint.__name__
    if isinstance(hint, types.GenericAlias) or typing.get_origin(hint):
        return "a list of pairs"
    return str(hint)
