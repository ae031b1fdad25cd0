"""Typed run configuration: schema, presets, and resolution of files and overrides."""

from configs.coerce import ConfigError, from_dict, to_dict, to_json
from configs.platform import check_resolved, resolve_auto
from configs.resolve import derive_model, load, validate
from configs.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    DistributedConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistributedConfig", "MeshConfig",
    "ModelConfig", "OptimConfig", "TrainConfig", "check_resolved", "derive_model", "from_dict",
    "load", "resolve_auto", "to_dict", "to_json", "validate",
]
