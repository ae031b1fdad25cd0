"""Turn presets, config files and `key=value` overrides into one validated Config.

Every failure here happens before any work starts and names the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import pathlib
import types
import typing
from typing import Any

from configs import presets
from configs.schema import MESH_AXES, Config, ModelConfig, Range

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
            values[key] = _coerce(dotted, value, hint)
    return cls(**values)


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply `dotted.key=value` strings, e.g. `model.num_layers=2`."""
    data = to_dict(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = key.strip()
        hint = _field_type(key)
        *sections, leaf = key.split(".")
        target = data
        for section in sections:
            target = target[section]
        target[leaf] = _coerce(key, _parse_text(raw, hint), hint)
    return validate(from_dict(data))


def load(name_or_path: str | None, overrides: list[str] = ()) -> Config:
    """The validated config of a preset name or JSON file, with overrides applied."""
    base = presets.get(name_or_path or presets.DEFAULT)
    if base is None:
        path = pathlib.Path(name_or_path)
        if not path.is_file():
            names = ", ".join(presets.names())
            raise ConfigError(f"--config {name_or_path!r} is neither a preset ({names}) nor a file")
        try:
            base = from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path}: not valid JSON ({e})") from e
    return apply_overrides(base, list(overrides))


def validate(config: Config) -> Config:
    """Fill in the fields left None with the values they derive from (the model family's
    defaults), then check every field against its schema type and the fields' relations."""
    config = dataclasses.replace(config, model=derive_model(config.model))
    for key, hint in field_hints().items():
        value = functools.reduce(getattr, key.split("."), config)
        if value is not None:  # None: an optional field with no derived value, e.g. min_lr
            _check_value(key, value, hint)
    for check in (_validate_model_shape, _validate_attention, _validate_data, _validate_train,
                  _validate_optim, _validate_mesh, _validate_distributed, _validate_profile):
        check(config)
    return config


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


# Model fields whose `auto` is decided by the platform the model runs on.
AUTO_FIELDS = ("dtype", "attention", "matmul")
# Each platform's fast attention kernel; a platform not listed gets the plain `xla` one.
_FAST_ATTENTION = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "cpu": "cpu"}


def resolve_auto(model: ModelConfig, platform: str) -> ModelConfig:
    """The model config with `auto` settings replaced by the choice for `platform`
    (cpu, gpu, cuda, rocm or tpu): the platform of the devices it will run on."""
    cpu = platform == "cpu"
    dtype = model.dtype
    if dtype == "auto":
        dtype = "float32" if cpu else "bfloat16"
    attention = model.attention
    if attention == "auto":
        attention = _FAST_ATTENTION.get(platform, "xla")
        if model.attention_dropout and attention in ("cudnn", "splash"):
            attention = "xla"  # the fused kernels have no dropout of the probabilities
    matmul = model.matmul
    if matmul == "auto":
        matmul = "cpu" if cpu else "xla"
    return dataclasses.replace(model, dtype=dtype, attention=attention, matmul=matmul)


def check_resolved(model: ModelConfig) -> ModelConfig:
    """The model config itself when no setting of it is still `auto`; else a ConfigError
    naming the first such field."""
    for name in AUTO_FIELDS:
        if getattr(model, name) == "auto":
            raise ConfigError(f"model.{name} is still auto; resolve it for the devices the "
                              "model runs on first: configs.resolve_auto(cfg, platform)")
    return model


def derive_model(m: ModelConfig) -> ModelConfig:
    """The model config with every None field set to its family's value."""
    if m.head_dim is None and m.num_heads > 0 and m.embed_dim % m.num_heads:
        raise ConfigError(f"model.head_dim is not set and model.embed_dim ({m.embed_dim}) is "
                          f"not a multiple of model.num_heads ({m.num_heads}); set both so "
                          "they fit")
    gpt2 = m.family == "gpt2"
    if m.mlp_dim is not None:
        mlp_dim = m.mlp_dim
    elif gpt2:
        mlp_dim = 4 * m.embed_dim
    else:
        mlp_dim = 256 * math.ceil(8 * m.embed_dim / 3 / 256)
    return dataclasses.replace(
        m,
        num_kv_heads=m.num_heads if m.num_kv_heads is None else m.num_kv_heads,
        head_dim=m.embed_dim // max(m.num_heads, 1) if m.head_dim is None else m.head_dim,
        mlp_dim=mlp_dim,
        bias=gpt2 if m.bias is None else m.bias,
        embed_init_std=_or(m.embed_init_std, m.init_std),
        position_init_std=_or(m.position_init_std, m.init_std),
        residual_init_std=_or(m.residual_init_std, m.init_std / math.sqrt(2 * m.num_layers)
                              if gpt2 and m.num_layers > 0 else m.init_std),
        unembed_init_std=_or(m.unembed_init_std, m.init_std))


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _check_value(key: str, value: Any, hint: Any) -> None:
    """The checks a field's type carries: its Literal choices and its Range."""
    allowed = choices(hint)
    if allowed and value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
    bounds = value_range(hint)
    if bounds is not None and value not in bounds:
        raise ConfigError(f"{key} {bounds.error(value)}")


def _validate_model_shape(config: Config) -> None:
    m = config.model
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads ({m.num_heads}) must be a multiple of "
            f"model.num_kv_heads ({m.num_kv_heads})")
    if m.family == "gpt2":
        _validate_gpt2_shape(m, config.data.seq_len)
    if m.family == "llama" and m.head_dim % 2:
        raise ConfigError(f"model.head_dim must be even for rotary embeddings, got {m.head_dim}")


def _validate_gpt2_shape(m: ModelConfig, seq_len: int) -> None:
    if m.num_kv_heads != m.num_heads:
        raise ConfigError(f"model.num_kv_heads ({m.num_kv_heads}) must equal model.num_heads "
                          f"({m.num_heads}) for gpt2, which has no grouped-query attention")
    if m.num_heads * m.head_dim != m.embed_dim:
        raise ConfigError(f"model.num_heads x model.head_dim ({m.num_heads} x {m.head_dim}) "
                          f"must equal model.embed_dim ({m.embed_dim}) for gpt2")
    if m.max_positions < seq_len:
        raise ConfigError(f"model.max_positions ({m.max_positions}) must be at least "
                          f"data.seq_len ({seq_len}) for learned positions")


def _validate_attention(config: Config) -> None:
    m = config.model
    if m.attention_dropout and m.attention in ("cudnn", "splash"):
        raise ConfigError(f"model.attention_dropout needs model.attention=xla or cpu (or auto); "
                          f"the {m.attention} kernel has no dropout")


def _validate_data(config: Config) -> None:
    if config.data.mixture and config.data.path:
        raise ConfigError("data.path and data.mixture are both set; use one of them")


def _validate_train(config: Config) -> None:
    t = config.train
    if t.batch_size % t.microbatches:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of "
                          f"train.microbatches ({t.microbatches})")


def _validate_optim(config: Config) -> None:
    optim = config.optim
    if optim.min_lr is not None and not 0 <= optim.min_lr <= optim.learning_rate:
        raise ConfigError(f"optim.min_lr ({optim.min_lr}) must be in [0, optim.learning_rate "
                          f"({optim.learning_rate})]")


def _validate_distributed(config: Config) -> None:
    dist = config.distributed
    if not dist.coordinator_address:
        if dist.num_processes or dist.process_id != -1:
            raise ConfigError("distributed.num_processes / process_id need "
                              "distributed.coordinator_address (host:port of process 0)")
        return
    if dist.num_processes < 1:
        raise ConfigError(f"distributed.num_processes must be >= 1 with a coordinator, "
                          f"got {dist.num_processes}")
    if not 0 <= dist.process_id < dist.num_processes:
        raise ConfigError(f"distributed.process_id must be in [0, {dist.num_processes}), "
                          f"got {dist.process_id}")


def _validate_profile(config: Config) -> None:
    profile = config.profile
    if not profile.steps:
        return
    if profile.start_step < 1:
        raise ConfigError("profile.start_step counts steps as the log line does, from 1; "
                          f"got {profile.start_step}")
    if profile.start_step > config.train.steps:
        raise ConfigError(f"profile.start_step ({profile.start_step}) is past the last step "
                          f"of the run, train.steps ({config.train.steps})")


def _validate_mesh(config: Config) -> None:
    sizes = {axis: getattr(config.mesh, axis) for axis in MESH_AXES}
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"at most one of mesh.data/fsdp/tensor may be -1, got {sizes}")
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis} must be a positive size or -1, got {size}")
    for logical, mesh_axes in config.mesh.rules:
        unknown = [a for a in mesh_axes if a not in MESH_AXES]
        if unknown:
            raise ConfigError(
                f"mesh.rules: logical axis {logical!r} maps to unknown mesh axes {unknown}; "
                f"valid mesh axes are {list(MESH_AXES)}")


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


def _field_type(key: str) -> Any:
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


def _parse_text(raw: str, hint: Any) -> Any:
    """Command-line text to a Python value; structured values are JSON."""
    inner = _optional(hint)
    if inner is not None:
        return None if raw.strip().lower() in _NONE_WORDS else _parse_text(raw, inner)
    if hint is str:
        return raw
    if typing.get_origin(hint) is tuple:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check (and from text, convert) a value to the field's type, naming the field on failure."""
    inner = _optional(hint)
    if inner is not None:
        return None if value is None else _coerce_optional(key, value, hint, inner)
    allowed = choices(hint)
    if allowed:
        _check_value(key, value, hint)
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
        return _coerce(key, value, inner)
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
