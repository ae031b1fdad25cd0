"""Named starting points for a run; `tiny` trains on a laptop CPU in a couple of minutes.

The large presets are the published shapes, for TPU/GPU; their parameter counts are
checked in the tests with `jax.eval_shape`. They initialise as Hugging Face does, except
the output layer of the wide Llama shapes: with std 0.02 the first logits have variance
embed_dim x 0.02^2, which starts the loss that much / 2 above ln(vocab_size) (0.4 nats at
2048 wide, 0.8 at 4096); a smaller std starts it within 0.2 nats, as for the narrow shapes.
"""

from __future__ import annotations

from configs.schema import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig

DEFAULT = "tiny"

_LARGE_MESH = MeshConfig(data=1, fsdp=-1)  # parameters and optimizer state over all devices

_PRESETS: dict[str, Config] = {
    "tiny": Config(model=ModelConfig(mlp_dim=384)),
    # The shape compared against MaxText on the same work: 20.58M parameters,
    # 2,048 tokens a step, float32.
    "bench-20m": Config(
        model=ModelConfig(vocab_size=32000, embed_dim=256, num_layers=4, num_heads=4,
                          num_kv_heads=4, head_dim=64, mlp_dim=1024, dtype="float32"),
        data=DataConfig(seq_len=256),
        train=TrainConfig(steps=100, batch_size=8, log_every=10),
        run_dir="runs/bench-20m",
    ),
    # GPT-2 small: 124,439,808 parameters with tied embeddings.
    "gpt2-small": Config(
        model=ModelConfig(family="gpt2", vocab_size=50257, embed_dim=768, num_layers=12,
                          num_heads=12, num_kv_heads=12, head_dim=64, mlp_dim=3072,
                          tie_embeddings=True, max_positions=1024),
        data=DataConfig(seq_len=1024),
        train=TrainConfig(steps=1000, batch_size=16, log_every=10),
        run_dir="runs/gpt2-small",
    ),
    # Llama 3.2 1B: 1,235,814,400 parameters (tied embeddings, 8 kv heads). For a v5e-16
    # slice (fsdp 16): 32 rows of 2,048 tokens, 2 a chip; 32 also splits over 2 such slices
    # (mesh.dcn_data=2) or a v5e-32.
    "llama-1b": Config(
        model=ModelConfig(vocab_size=128256, embed_dim=2048, num_layers=16, num_heads=32,
                          num_kv_heads=8, head_dim=64, mlp_dim=8192, rope_theta=500000.0,
                          tie_embeddings=True, embed_init_std=0.01, scan_layers=True,
                          remat="save_dots"),
        data=DataConfig(seq_len=2048),
        mesh=_LARGE_MESH,
        train=TrainConfig(steps=1000, batch_size=32, log_every=10),
        run_dir="runs/llama-1b",
    ),
    # Llama 2 7B: 6,738,415,616 parameters. For a v5e-256 slice (fsdp 256, 1 row of 4,096
    # tokens a chip, about 1M tokens a step); the same 256 rows split 4 a chip on a v5p-128
    # (64 chips).
    "llama-7b": Config(
        model=ModelConfig(vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32,
                          num_kv_heads=32, head_dim=128, mlp_dim=11008,
                          unembed_init_std=0.007, scan_layers=True, remat="full"),
        data=DataConfig(seq_len=4096),
        mesh=_LARGE_MESH,
        train=TrainConfig(steps=1000, batch_size=256, log_every=10),
        run_dir="runs/llama-7b",
    ),
}


def get(name: str) -> Config | None:
    """The preset of that name, or None if there is none."""
    return _PRESETS.get(name)


def names() -> list[str]:
    return sorted(_PRESETS)
