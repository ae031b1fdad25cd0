"""Typed configuration schema: every knob of a run, with its meaning.

Configs are frozen dataclasses so a resolved config can be hashed, compared,
printed and saved with every checkpoint without anyone mutating it mid-run.
"""

from __future__ import annotations

import dataclasses

# Logical axis name -> mesh axes it is split over. The only place in the project
# that connects the model's logical names to the physical mesh axes.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", ()),
    ("embed", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("norm", ()),
    ("layers", ()),
    ("positions", ()),
)

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder-only transformer, and how its step is computed."""

    family: str = "llama"
    """`llama` (RMSNorm, rotary, SwiGLU, grouped-query attention) or `gpt2` (LayerNorm with
    bias, learned positions, GELU MLP, biases)."""
    vocab_size: int = 320
    """Rows of the embedding table; at least the tokenizer's vocabulary, padded for sharding."""
    embed_dim: int = 128
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Query heads per attention layer."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide num_heads."""
    head_dim: int = 32
    """Width of one attention head."""
    mlp_dim: int = 384
    """Hidden width of the SwiGLU MLP."""
    rope_theta: float = 10000.0
    """Base wavelength of the rotary position embedding."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    init_std: float = 0.02
    """Standard deviation of the normal initialiser of weight matrices."""
    tie_embeddings: bool = False
    """Use the input embedding table as the output projection (GPT-2 does)."""
    max_positions: int = 1024
    """Rows of the learned position table (`gpt2` only); at least data.seq_len."""
    dtype: str = "auto"
    """Compute dtype of activations: `float32`, `bfloat16`, `float16`, or `auto` (bfloat16 on
    TPU/GPU, float32 on CPU). Parameters and optimizer state are always float32."""
    attention: str = "auto"
    """Attention kernel: `xla` (plain einsums), `cudnn` (cuDNN flash attention, NVIDIA GPUs),
    `splash` (Pallas splash kernel, TPU; interpreted, slowly, elsewhere), or `auto` (the
    platform's fast kernel)."""
    scan_layers: bool = False
    """Run the blocks as one `lax.scan` over stacked weights: one compiled layer, fast compiles
    for deep models. Changes the parameter layout (a leading `layers` axis)."""
    remat: str = "none"
    """Recompute activations in the backward pass, per block: `none`, `full`, or `save_dots`
    (keep matmul outputs, recompute the rest)."""
    loss_chunk_tokens: int = 512
    """Compute the output projection and cross-entropy fused, about this many tokens at a
    time, so the batch x length x vocab logits are never held; 0 computes them whole."""


# Model fields that change how the step computes, not the parameters it trains:
# a checkpoint restores whatever their values.
COMPUTE_ONLY_FIELDS = ("dtype", "attention", "remat", "loss_chunk_tokens")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training text comes from and how it is cut into rows."""

    path: str = ""
    """A prepared dataset (from `python -m input.prepare`), or a directory/file of .txt / .jsonl
    documents tokenized at start-up; empty means the embedded default corpus."""
    mixture: tuple[tuple[str, float], ...] = ()
    """Prepared datasets sampled row by row by weight, e.g. [["data/web", 0.7], ["data/code",
    0.3]]; replaces `path`."""
    tokenizer: str = "bytes"
    """Tokenizer; a prepared dataset must have been made with the same one."""
    verify_checksums: bool = True
    """Check every prepared shard's CRC32 at start-up (sizes are always checked)."""
    jsonl_field: str = "text"
    """Field that holds the document text in .jsonl files."""
    seq_len: int = 128
    """Tokens per training row (the model sees seq_len inputs and predicts seq_len targets)."""
    eval_fraction: float = 0.05
    """Fraction of documents held out for evaluation (every round(1/f)-th document)."""
    read_threads: int = 2
    """Grain threads that build rows and batches ahead of the step."""
    prefetch_batches: int = 4
    """Batches Grain keeps ready ahead of the step."""
    workers: int = 0
    """Grain worker processes building batches (0: threads of this process only)."""
    device_prefetch: int = 2
    """Global batches kept ready on the devices ahead of the step."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh and the logical-to-mesh sharding rules."""

    data: int = -1
    """Data-parallel axis size; -1 means all devices not used by the other axes."""
    fsdp: int = 1
    """Fully-sharded data-parallel axis size (parameters and optimizer state split)."""
    tensor: int = 1
    """Tensor-parallel axis size (heads, mlp and vocab split)."""
    rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES
    """Logical axis name -> mesh axes; a name missing here is replicated."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, cosine decay and global-norm clipping."""

    learning_rate: float = 3e-3
    """Peak learning rate reached at the end of warmup."""
    warmup_steps: int = 30
    """Steps of linear warmup from zero."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of the peak."""
    weight_decay: float = 0.1
    """Decoupled weight decay applied to matrices (not to norm scales)."""
    beta1: float = 0.9
    """Adam first-moment decay."""
    beta2: float = 0.95
    """Adam second-moment decay."""
    grad_clip: float = 1.0
    """Clip gradients to this global norm; 0 disables clipping."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Length and rhythm of the training loop."""

    steps: int = 300
    """Total optimizer steps of the run (the schedule spans these)."""
    batch_size: int = 16
    """Global batch size in rows; must divide evenly over the data and fsdp axes."""
    log_every: int = 10
    """Print a log line every this many steps."""
    eval_batches: int = 8
    """Held-out batches evaluated at the end of the run."""
    stop_after: int = 0
    """Stop this invocation after this many steps (0: run to `steps`); for time-sliced jobs."""
    compile_cache: bool = True
    """Keep compiled steps on disk so a restarted run skips compilation."""
    compile_cache_dir: str = ""
    """Where compiled steps are kept; empty means `<run_dir>/compile_cache`."""
    microbatches: int = 1
    """Gradient accumulation: split each batch into this many micro-batches, run them one
    after another and apply one update with their token-weighted mean gradient."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing of train state, data position and config."""

    every: int = 100
    """Save every this many steps (0: only at the end)."""
    keep: int = 3
    """Keep the last this many checkpoints."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this, permanently (0: none)."""
    compress: bool = False
    """zstd-compress saved arrays: fewer bytes, but CPU time that competes with the step."""
    fallback: bool = False
    """If the latest checkpoint is damaged, resume from the previous complete one."""
    async_save: bool = True
    """Write checkpoints in the background while training continues."""


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """A JAX profiler trace of a window of steps, into `<run_dir>/profile/` (TensorBoard's
    profile plugin, or `perfetto_trace.json.gz` in ui.perfetto.dev)."""

    start_step: int = 10
    """First traced step, numbered as on the log line (the first step is 1). A run resumed past
    it traces only the rest of the window, and nothing once the window is behind it."""
    steps: int = 0
    """Number of consecutive steps traced (0: no trace)."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process (multi-host) runs; `jax.distributed.initialize` is called from these.

    Left empty, a TPU VM pod slice (or a SLURM / Open MPI job) is detected and initialised
    automatically, and anything else runs as a single process.
    """

    coordinator_address: str = ""
    """`host:port` of process 0, which all processes connect to."""
    num_processes: int = 0
    """Number of processes in the job (with coordinator_address)."""
    process_id: int = -1
    """This process's index in [0, num_processes) (with coordinator_address)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    profile: ProfileConfig = ProfileConfig()
    distributed: DistributedConfig = DistributedConfig()
    seed: int = 0
    """Seeds parameter initialisation and the data shuffle."""
    run_dir: str = "runs/tiny"
    """Checkpoints and logs go here; a run started again in the same directory resumes."""
