"""Turn presets, config files and `key=value` overrides into one validated Config.

Every failure here happens before any work starts and names the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import pathlib
import types
import typing
from typing import Any

from configs import presets
from configs.schema import MESH_AXES, Config, ModelConfig

# Fields whose value is one of a fixed set of names.
CHOICES = {
    "model.family": ("llama", "gpt2"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.attention": ("auto", "xla", "cudnn", "splash"),
    "model.remat": ("none", "full", "save_dots"),
}


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
    hints = typing.get_type_hints(cls)
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
    """Check relations between fields that no single type can express."""
    m, t, d = config.model, config.train, config.data
    positive = {
        "model.vocab_size": m.vocab_size, "model.embed_dim": m.embed_dim,
        "model.num_layers": m.num_layers, "model.num_heads": m.num_heads,
        "model.num_kv_heads": m.num_kv_heads, "model.head_dim": m.head_dim,
        "model.mlp_dim": m.mlp_dim, "data.seq_len": d.seq_len,
        "train.steps": t.steps, "train.batch_size": t.batch_size,
        "train.log_every": t.log_every, "checkpoint.keep": config.checkpoint.keep,
        "data.read_threads": d.read_threads, "data.prefetch_batches": d.prefetch_batches,
        "data.device_prefetch": d.device_prefetch, "train.microbatches": t.microbatches,
        "model.max_positions": m.max_positions,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    non_negative = {
        "train.eval_batches": t.eval_batches, "train.stop_after": t.stop_after,
        "checkpoint.every": config.checkpoint.every,
        "checkpoint.keep_every": config.checkpoint.keep_every, "data.workers": d.workers,
        "optim.warmup_steps": config.optim.warmup_steps, "optim.grad_clip": config.optim.grad_clip,
        "optim.learning_rate": config.optim.learning_rate,
        "model.loss_chunk_tokens": m.loss_chunk_tokens,
        "profile.start_step": config.profile.start_step, "profile.steps": config.profile.steps,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {config.seed}")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads ({m.num_heads}) must be a multiple of "
            f"model.num_kv_heads ({m.num_kv_heads})")
    if m.family == "llama" and m.head_dim % 2:
        raise ConfigError(f"model.head_dim must be even for rotary embeddings, got {m.head_dim}")
    if m.family == "gpt2" and m.max_positions < d.seq_len:
        raise ConfigError(f"model.max_positions ({m.max_positions}) must be at least "
                          f"data.seq_len ({d.seq_len}) for learned positions")
    if t.batch_size % t.microbatches:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of "
                          f"train.microbatches ({t.microbatches})")
    if not 0.0 < d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in (0, 1), got {d.eval_fraction}")
    if d.mixture and d.path:
        raise ConfigError("data.path and data.mixture are both set; use one of them")
    for key, value in {"model.family": m.family, "model.dtype": m.dtype,
                       "model.attention": m.attention, "model.remat": m.remat}.items():
        if value not in CHOICES[key]:
            raise ConfigError(f"{key} must be one of {', '.join(CHOICES[key])}; got {value!r}")
    _validate_mesh(config)
    _validate_distributed(config)
    _validate_profile(config)
    return config


def resolve_auto(model: ModelConfig, platform: str) -> ModelConfig:
    """The model config with `auto` settings replaced by the choice for `platform`
    (cpu, gpu, cuda, rocm or tpu)."""
    dtype = model.dtype
    if dtype == "auto":
        dtype = "float32" if platform == "cpu" else "bfloat16"
    attention = model.attention
    if attention == "auto":
        attention = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform, "xla")
    return dataclasses.replace(model, dtype=dtype, attention=attention)


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


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            keys += _all_keys(hints[field.name], f"{prefix}{field.name}.")
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.0)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def _field_type(key: str) -> Any:
    """The type hint of a dotted leaf key; raises naming the closest valid key."""
    if key not in _all_keys():
        raise ConfigError(_unknown_key_message(key))
    cls: type = Config
    *sections, leaf = key.split(".")
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    return typing.get_type_hints(cls)[leaf]


def _parse_text(raw: str, hint: Any) -> Any:
    """Command-line text to a Python value; structured values are JSON."""
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
    expected = _type_name(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                parsed = float(value)
                if math.isfinite(parsed):
                    return parsed
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(hint) is tuple:
        pair = typing.get_args(typing.get_args(hint)[0])
        return _coerce_mixture(key, value) if pair[1] is float else _coerce_rules(key, value)
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


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
    if isinstance(hint, type):
        return hint.__name__
    if isinstance(hint, types.GenericAlias) or typing.get_origin(hint):
        return "a list of pairs"
    return str(hint)
