"""Is a saved checkpoint's config compatible with the config of the run restoring it?"""

from __future__ import annotations

import dataclasses
from typing import Any

from configs.resolve import derive_model
from configs.schema import COMPUTE_ONLY_FIELDS, INIT_FIELDS, ModelConfig


def config_diff(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: checkpoint X, config Y` for every leaf that differs, in dotted-key order."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: checkpoint {a!r}, config {b!r}")
    return lines


def model_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Differences in the model section that make the saved parameters unusable.

    A field the checkpoint lacks (written before the field existed) counts as its default,
    and fields left to the family are compared as the family sets them.
    """
    known = {field.name for field in dataclasses.fields(ModelConfig)}
    ignored = (*COMPUTE_ONLY_FIELDS, *INIT_FIELDS)

    def parameter_fields(section: dict[str, Any]) -> dict[str, Any]:
        derived = dataclasses.asdict(derive_model(ModelConfig(
            **{k: v for k, v in section.items() if k in known})))
        return {k: v for k, v in {**section, **derived}.items() if k not in ignored}
    return config_diff(parameter_fields(saved.get("model", {})),
                       parameter_fields(current.get("model", {})), "model.")
