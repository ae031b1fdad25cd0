"""Turn presets, config files and `key=value` overrides into one validated Config.

Every failure here happens before any work starts and names the offending key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any

from configs import presets
from configs.coerce import (
    ConfigError,
    check_value,
    coerce,
    field_hints,
    field_type,
    from_dict,
    parse_text,
    to_dict,
)
from configs.schema import MESH_AXES, Config, ModelConfig


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply `dotted.key=value` strings, e.g. `model.num_layers=2`."""
    data = to_dict(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = key.strip()
        hint = field_type(key)
        *sections, leaf = key.split(".")
        target = data
        for section in sections:
            target = target[section]
        target[leaf] = coerce(key, parse_text(raw, hint), hint)
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
            check_value(key, value, hint)
    for check in (_validate_model_shape, _validate_attention, _validate_data, _validate_train,
                  _validate_optim, _validate_mesh, _validate_distributed, _validate_profile):
        check(config)
    return config

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
