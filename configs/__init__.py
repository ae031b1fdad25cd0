"""Typed run configuration: schema, presets, and resolution of files and overrides."""

from configs.resolve import (
    ConfigError,
    check_resolved,
    derive_model,
    from_dict,
    load,
    resolve_auto,
    to_dict,
    to_json,
    validate,
)
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
