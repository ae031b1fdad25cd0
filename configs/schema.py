"""Typed configuration schema: every knob of a run, with its meaning.

Configs are frozen dataclasses so a resolved config can be hashed, compared,
printed and saved with every checkpoint without anyone mutating it mid-run.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds on a numeric field, attached as `Annotated[int, Range(min=0)]`: `min` and `max`
    are inclusive unless marked open; a None end is unbounded. `message` (with `{value}`)
    replaces the usual "must be ..., got ..." where a bare range would not explain the field."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    message: str = ""

    def __contains__(self, value: float) -> bool:
        above = self.min is None or (value > self.min if self.min_open else value >= self.min)
        below = self.max is None or (value < self.max if self.max_open else value <= self.max)
        return above and below

    def describe(self) -> str:
        """The range in words: "positive", ">= 0", "in [0, 1)", "in (0, 1]", "< 2**32"."""
        if self.min is not None and self.max is not None:
            return (f"in {'(' if self.min_open else '['}{_number(self.min)}, "
                    f"{_number(self.max)}{')' if self.max_open else ']'}")
        if self.min == 0 and self.min_open:
            return "positive"
        if self.min is not None:
            return f"{'>' if self.min_open else '>='} {_number(self.min)}"
        return f"{'<' if self.max_open else '<='} {_number(self.max)}"

    def error(self, value: float) -> str:
        """What is wrong with an out-of-range value, to follow the field's name."""
        if self.message:
            return self.message.format(value=value)
        return f"must be {self.describe()}, got {value}"


def _number(x: float) -> str:
    """A bound as people write it: 1 rather than 1.0, 2**32 rather than 4294967296."""
    if x == int(x):
        x = int(x)
        if x > 1024 and x & (x - 1) == 0:
            return f"2**{x.bit_length() - 1}"
    return str(x)


# The constraints many fields share; one only a single field has is written on that field.
Positive = Annotated[int, Range(min=0, min_open=True)]
NonNegative = Annotated[int, Range(min=0)]
PositiveFloat = Annotated[float, Range(min=0, min_open=True)]
NonNegativeFloat = Annotated[float, Range(min=0)]
# A dropout rate, Adam decay or held-out share: at 1 nothing would be left (or forgotten).
Rate = Annotated[float, Range(0, 1, max_open=True)]
Fraction = Annotated[float, Range(0, 1)]

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

    family: Literal["llama", "gpt2"] = "llama"
    """`llama` (RMSNorm, rotary, SwiGLU, grouped-query attention) or `gpt2` (LayerNorm with
    bias, learned positions, GELU MLP, biases). Fields left None take the family's value."""
    vocab_size: Positive = 320
    """Rows of the embedding table; at least the tokenizer's vocabulary, padded for sharding."""
    embed_dim: Positive = 128
    """Width of the residual stream."""
    num_layers: Positive = 4
    """Number of transformer blocks."""
    num_heads: Positive = 4
    """Query heads per attention layer."""
    num_kv_heads: Positive | None = None
    """Key/value heads (grouped-query attention); must divide num_heads. None: num_heads."""
    head_dim: Positive | None = None
    """Width of one attention head. None: embed_dim / num_heads."""
    mlp_dim: Positive | None = None
    """Hidden width of the MLP. None: the family's, 4 x embed_dim for gpt2; for llama 8/3 x
    embed_dim rounded up to a multiple of 256 (SwiGLU's three matrices cost what two 4 x D
    ones do)."""
    rope_theta: PositiveFloat = 10000.0
    """Base wavelength of the rotary position embedding."""
    norm_eps: NonNegativeFloat = 1e-5
    """Epsilon of RMSNorm (llama) or LayerNorm (gpt2)."""
    bias: bool | None = None
    """Biases in the attention and MLP projections. None: the family's (gpt2 yes, llama
    no). LayerNorm keeps its bias either way."""
    init_std: NonNegativeFloat = 0.02
    """Standard deviation of the normal initialiser of the projection matrices (Hugging
    Face's `initializer_range`); biases start at zero and norm scales at one."""
    embed_init_std: NonNegativeFloat | None = None
    """Initial std of the token embedding table (with tied embeddings, also the output
    layer's). None: init_std, as Hugging Face initialises both families."""
    position_init_std: NonNegativeFloat | None = None
    """Initial std of the learned position table (gpt2). None: init_std."""
    residual_init_std: NonNegativeFloat | None = None
    """Initial std of the projections that write into the residual stream (attention output,
    MLP down). None: the family's, init_std / sqrt(2 x num_layers) for gpt2 (GPT-2's scaled
    residual init), init_std for llama."""
    unembed_init_std: NonNegativeFloat | None = None
    """Initial std of the untied output layer. None: init_std."""
    embed_dropout: Rate = 0.0
    """Dropout rate on the embeddings (token plus position) entering the first block."""
    attention_dropout: Rate = 0.0
    """Dropout rate on the attention probabilities (needs the `xla` or `cpu` attention
    kernel)."""
    residual_dropout: Rate = 0.0
    """Dropout rate on each attention and MLP output before it joins the residual stream."""
    tie_embeddings: bool = False
    """Use the input embedding table as the output projection (GPT-2 does)."""
    max_positions: Positive = 1024
    """Rows of the learned position table (`gpt2` only); at least data.seq_len."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of activations: `float32`, `bfloat16`, `float16`, or `auto` (bfloat16 on
    TPU/GPU, float32 on CPU). Parameters and optimizer state are always float32."""
    attention: Literal["auto", "xla", "cpu", "cudnn", "splash"] = "auto"
    """Attention kernel: `xla` (plain einsums, differentiated by JAX), `cpu` (the same einsums
    with a hand-written backward pass, fast on XLA:CPU), `cudnn` (cuDNN flash attention, NVIDIA
    GPUs), `splash` (Pallas splash kernel, TPU; interpreted, slowly, elsewhere), or `auto` (the
    platform's fast kernel: splash on TPU, cudnn on GPU, cpu on CPU; with attention dropout,
    cpu on CPU and xla elsewhere)."""
    matmul: Literal["auto", "xla", "cpu"] = "auto"
    """How projections contract activations with weights: `xla` (plain einsums), `cpu` (2-D
    matmuls whose weight gradient takes the transposed operand laid out first, fast on
    XLA:CPU), or `auto` (cpu on CPU, xla elsewhere)."""
    scan_layers: bool = False
    """Run the blocks as one `lax.scan` over stacked weights: one compiled layer, fast compiles
    for deep models. Changes the parameter layout (a leading `layers` axis)."""
    remat: Literal["none", "full", "save_dots"] = "none"
    """Recompute activations in the backward pass, per block: `none`, `full`, or `save_dots`
    (keep matmul outputs, recompute the rest)."""
    loss_chunk_tokens: NonNegative = 512
    """Compute the output projection and cross-entropy fused, about this many tokens at a
    time, so the batch x length x vocab logits are never held; 0 computes them whole."""


# Model fields that change how the step computes, not the parameters it trains:
# a checkpoint restores whatever their values.
COMPUTE_ONLY_FIELDS = ("dtype", "attention", "matmul", "remat", "loss_chunk_tokens",
                       "embed_dropout", "attention_dropout", "residual_dropout")
# Model fields read only when parameters are first drawn.
INIT_FIELDS = ("init_std", "embed_init_std", "position_init_std", "residual_init_std",
               "unembed_init_std")


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
    seq_len: Positive = 128
    """Tokens per training row (the model sees seq_len inputs and predicts seq_len targets)."""
    eval_fraction: Rate = 0.05
    """Fraction of `path`'s documents held out for evaluation (every round(1/f)-th document;
    of a prepared dataset, the end of its token stream); 0 trains on all of them. Not used
    with `eval_path`."""
    eval_path: str = ""
    """Held-out data of its own: a .txt / .jsonl file, a directory of them or a prepared
    dataset. When set, `path` (or `mixture`) is trained on whole."""
    read_threads: Positive = 2
    """Grain threads that build rows and batches ahead of the step."""
    prefetch_batches: Positive = 4
    """Batches Grain keeps ready ahead of the step."""
    workers: NonNegative = 0
    """Grain worker processes building batches (0: threads of this process only)."""
    device_prefetch: Positive = 2
    """Global batches kept ready on the devices ahead of the step."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh and the logical-to-mesh sharding rules."""

    data: int = -1
    """Data-parallel axis size; -1 means all devices (of a slice) not used by the other
    axes."""
    fsdp: int = 1
    """Fully-sharded data-parallel axis size (parameters and optimizer state split)."""
    tensor: int = 1
    """Tensor-parallel axis size (heads, mlp and vocab split)."""
    dcn_data: Positive = 1
    """Multi-slice: the data axis also splits this many ways across slices (over the
    data-centre network), so it has data x dcn_data ways in all; `data`, `fsdp` and
    `tensor` are the ways within one slice."""
    dcn_fsdp: Positive = 1
    """Multi-slice: the fsdp axis also splits this many ways across slices (fsdp x dcn_fsdp
    ways in all). dcn_data x dcn_fsdp must be the number of slices."""
    rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES
    """Logical axis name -> mesh axes; a name missing here is replicated."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, a decay schedule and global-norm clipping."""

    learning_rate: NonNegativeFloat = 3e-3
    """Peak learning rate, reached at the last warmup step."""
    warmup_steps: NonNegative = 30
    """Steps of linear warmup: step s (from 1) of the warmup runs at s / warmup_steps of the
    peak, so the first step already learns."""
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """After warmup: `cosine` or `linear` decay to the minimum at `decay_steps`; `constant`
    (the peak throughout); `wsd` (warmup-stable-decay: the peak, then a linear decay to the
    minimum over the last `wsd_decay_fraction` of `decay_steps`)."""
    decay_steps: Positive | None = None
    """Step at which the decay reaches the minimum, counted from the start of the run (warmup
    included); later steps stay at the minimum. None: train.steps."""
    min_lr_ratio: Fraction = 0.1
    """Minimum learning rate as a fraction of the peak (unless `min_lr` is set)."""
    min_lr: float | None = None
    """Minimum learning rate, absolute; replaces min_lr_ratio when set."""
    wsd_decay_fraction: Annotated[float, Range(0, 1, min_open=True)] = 0.2
    """`wsd` only: the share of decay_steps, at its end, spent decaying."""
    weight_decay: NonNegativeFloat = 0.1
    """Decoupled weight decay (AdamW: each step shrinks a weight by lr x this). Applies to the
    projection matrices and the output layer, and to the embedding tables unless
    `decay_embeddings` is false; never to biases or norm parameters."""
    decay_embeddings: bool = True
    """Apply weight decay to the token and position embedding tables (as Hugging Face's
    Trainer and nanoGPT do); a tied table is the output layer too."""
    beta1: Rate = 0.9
    """Adam first-moment decay."""
    beta2: Rate = 0.95
    """Adam second-moment decay."""
    eps: NonNegativeFloat = 1e-8
    """Adam's epsilon, added to the root of the second moment."""
    grad_clip: NonNegativeFloat = 1.0
    """Clip gradients to this global norm; 0 disables clipping."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Length and rhythm of the training loop."""

    steps: Positive = 300
    """Total optimizer steps of the run (the schedule spans these)."""
    batch_size: Positive = 16
    """Global batch size in rows; must divide evenly over the data and fsdp axes."""
    log_every: Positive = 10
    """Print a log line every this many steps."""
    eval_batches: Annotated[int, Range(
        min=-1, message="must be >= 0, or -1 for all held-out rows; got {value}")] = 8
    """Held-out batches of each held-out dataset per evaluation; -1: all held-out rows."""
    eval_every: NonNegative = 0
    """Evaluate held-out loss every this many steps, besides the end of the run (0: only at
    the end)."""
    stop_after: NonNegative = 0
    """Stop this invocation after this many steps (0: run to `steps`); for time-sliced jobs."""
    compile_cache: bool = True
    """Keep compiled steps on disk so a restarted run skips compilation."""
    compile_cache_dir: str = ""
    """Where compiled steps are kept; empty means `<run_dir>/compile_cache`."""
    microbatches: Positive = 1
    """Gradient accumulation: split each batch into this many micro-batches, run them one
    after another and apply one update with their token-weighted mean gradient."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing of train state, data position and config."""

    every: NonNegative = 100
    """Save every this many steps (0: only at the end)."""
    keep: Positive = 3
    """Keep the last this many checkpoints."""
    keep_every: NonNegative = 0
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

    start_step: NonNegative = 10
    """First traced step, numbered as on the log line (the first step is 1). A run resumed past
    it traces only the rest of the window, and nothing once the window is behind it."""
    steps: NonNegative = 0
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
    seed: Annotated[int, Range(0, 2**32, max_open=True)] = 0
    """Seeds parameter initialisation and the data shuffle."""
    run_dir: str = "runs/tiny"
    """Checkpoints and logs go here; a run started again in the same directory resumes."""
