"""Is a saved checkpoint's config compatible with the config of the run restoring it?"""

from __future__ import annotations

from typing import Any


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
    """Differences in the model section, which make the saved parameters unusable."""
    return config_diff(saved.get("model", {}), current.get("model", {}), "model.")
