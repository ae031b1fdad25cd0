"""Named starting points for a run; `tiny` trains on a laptop CPU in a couple of minutes."""

from __future__ import annotations

from configs.schema import Config, DataConfig, ModelConfig, TrainConfig

DEFAULT = "tiny"

_PRESETS: dict[str, Config] = {
    "tiny": Config(),
    # The shape compared against MaxText on the same work: 20.58M parameters,
    # 2,048 tokens a step, float32.
    "bench-20m": Config(
        model=ModelConfig(vocab_size=32000, embed_dim=256, num_layers=4, num_heads=4,
                          num_kv_heads=4, head_dim=64, mlp_dim=1024),
        data=DataConfig(seq_len=256),
        train=TrainConfig(steps=100, batch_size=8, log_every=10),
        run_dir="runs/bench-20m",
    ),
}


def get(name: str) -> Config | None:
    """The preset of that name, or None if there is none."""
    return _PRESETS.get(name)


def names() -> list[str]:
    return sorted(_PRESETS)
