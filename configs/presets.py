"""Named starting points for a run; `tiny` trains on a laptop CPU in a couple of minutes."""

from __future__ import annotations

from configs.schema import Config

DEFAULT = "tiny"

_PRESETS: dict[str, Config] = {
    "tiny": Config(),
}


def get(name: str) -> Config | None:
    """The preset of that name, or None if there is none."""
    return _PRESETS.get(name)


def names() -> list[str]:
    return sorted(_PRESETS)
