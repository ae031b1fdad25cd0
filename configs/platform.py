"""`auto` model settings decided by the platform of the devices the model runs on."""

from __future__ import annotations

import dataclasses

from configs.coerce import ConfigError
from configs.schema import ModelConfig

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
