"""Hugging Face GPT-2 / Llama checkpoints <-> this project's checkpoints.

    python -m hf.convert --from-hf HF_DIR --out RUN_DIR [key=value ...]
    python -m hf.convert --to-hf RUN_DIR --out HF_DIR [--step N]

`--from-hf` reads a model directory (config.json and *.safetensors, sharded or not; on
disk or in a gs:// bucket, which is copied down first) and writes step 0 of a run: the
parameters, a fresh optimizer state and the matching config, so `python -m train
--config RUN_DIR/config.json` fine-tunes from it and `python -m generate RUN_DIR` samples
from it. `--to-hf` writes config.json and model.safetensors (to disk or a bucket) that
`transformers.AutoModelForCausalLM.from_pretrained` loads.
Weights are float32 both ways, so to-hf then from-hf gives back identical bits.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

import configs
import input as data_input
import model
import storage
from checkpoint import (
    Checkpointer,
    CheckpointError,
    aftermath,
    checkpoint_dir,
    latest_complete_step,
    model_mismatch,
    restore_params,
    saved_config,
)
from configs.resolve import apply_overrides
from configs.schema import COMPUTE_ONLY_FIELDS, Config, DataConfig, ModelConfig
from hf.format import (
    ConversionError,
    Params,
    hf_config,
    model_config_from_hf,
    params_from_hf,
    params_to_hf,
)
from train.optimizer import make_optimizer
from train.state import TrainState

# Prefix of the base model's tensors in a *ForCausalLM state dict; files saved from the
# base model alone (the original `gpt2` upload) lack it.
BASE_PREFIX = {"gpt2": "transformer.", "llama": "model."}
# Model fields an override may still set on a converted run: they do not change the weights
# (scan_layers changes only their layout, and the conversion writes that layout).
FREE_MODEL_FIELDS = (*COMPUTE_ONLY_FIELDS, "scan_layers")


def read_hf_tensors(hf_dir: pathlib.Path, family: str, tied: bool) -> dict[str, Callable[[], Any]]:
    """Tensor name (as a *ForCausalLM state dict names it) -> loader, over every shard.

    Loaders read one tensor when called, so a large model is never whole in memory
    twice. Buffers that some files carry (GPT-2's causal mask, Llama's inverse
    frequencies) and a tied model's copy of its embedding as lm_head are left out.
    """
    loaders: dict[str, Callable[[], Any]] = {}
    for path in _shard_files(hf_dir):
        for name in _tensor_names(path):
            canonical = _canonical(name, family)
            if not _is_buffer(canonical) and not (tied and canonical == "lm_head.weight"):
                loaders[canonical] = _loader(path, name)
    return loaders


def _shard_files(hf_dir: storage.Path | pathlib.Path) -> list[storage.Path | pathlib.Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [hf_dir / name for name in names]
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir} has no *.safetensors files (pytorch_model.bin is not "
                              "read: convert it with transformers' save_pretrained first)")
    return files


def _tensor_names(path: pathlib.Path) -> list[str]:
    with safe_open(str(path), framework="flax") as f:
        return list(f.keys())


def _loader(path: pathlib.Path, name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        # The flax reader (unlike the numpy one) understands bfloat16, the dtype of most
        # Llama releases; the host CPU keeps a large model off an accelerator's memory.
        with jax.default_device(jax.devices("cpu")[0]):
            with safe_open(str(path), framework="flax") as f:
                return np.asarray(f.get_tensor(name))
    return load


def _canonical(name: str, family: str) -> str:
    prefix = BASE_PREFIX[family]
    return name if name.startswith(prefix) or name.startswith("lm_head.") else prefix + name


def _is_buffer(name: str) -> bool:
    return name.endswith((".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq"))


def from_hf(hf_dir: str | pathlib.Path, run_dir: str | pathlib.Path,
            overrides: list[str] = ()) -> Config:
    """Write step 0 of a run in `run_dir` from a Hugging Face model directory; its config."""
    hf_dir, run_dir = storage.path(hf_dir), storage.path(run_dir)
    directory = checkpoint_dir(run_dir)
    if directory.is_dir() and any(directory.iterdir()):
        raise ConversionError(f"{directory} already holds checkpoints; choose a new --out")
    cfg = model_config_from_hf(_read_json(hf_dir / "config.json"))
    with storage.local_copy(hf_dir, suffixes=(".json", ".safetensors")) as local_hf:
        tokenizer = _usable_tokenizer(local_hf, hf_dir)
        # Its own copy, by absolute path: the run works from any directory, and alone.
        spec = os.fspath(run_dir / "tokenizer.json") if tokenizer else "bytes"
        config = _run_config(cfg, run_dir, spec, overrides)
        _shard_files(hf_dir)  # where the user has it, so that an error names that
        params = params_from_hf(read_hf_tensors(local_hf, cfg.family, cfg.tie_embeddings), cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        if tokenizer:
            storage.path(spec).write_bytes(tokenizer.read_bytes())
    _save_step_zero(config, params)
    (run_dir / "config.json").write_text(configs.to_json(config) + "\n")
    return config


def to_hf(run_dir: str | pathlib.Path, hf_dir: str | pathlib.Path,
          step: int | None = None) -> storage.Path:
    """Write config.json and model.safetensors of a run's step (default: the latest)."""
    directory = checkpoint_dir(run_dir)
    step = latest_complete_step(directory, step)
    config = configs.from_dict(saved_config(directory, step))
    cfg = configs.derive_model(config.model)
    eos_id, tokenizer_file = _tokenizer_of(config.data)
    hf = hf_config(cfg, eos_id)  # refuses a shape HF cannot express before reading anything
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu),
                          model.abstract_params(cfg))
    params = jax.tree.map(np.asarray, restore_params(directory, step, target))
    if cfg.scan_layers:
        params = jax.tree.map(np.asarray, model.unstack_layers(params))
    with storage.written_to(hf_dir) as local_out:
        save_file(params_to_hf(params, cfg), str(local_out / "model.safetensors"),
                  metadata={"format": "pt"})  # transformers refuses files without a format
        (local_out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if tokenizer_file is not None:
            (local_out / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    return storage.path(hf_dir)


def _read_json(path: storage.Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"{path} does not exist: not a Hugging Face model directory")
    return json.loads(path.read_text())


def _usable_tokenizer(hf_dir: pathlib.Path, shown: storage.Path) -> pathlib.Path | None:
    """The directory's tokenizer.json if our tokenizer loader accepts it (it needs an
    end-of-text token), else None: the run then keeps the byte tokenizer. `hf_dir` is on
    local disk, `shown` where the user has it."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        print(f"note: {shown} has no tokenizer.json; data.tokenizer stays 'bytes'")
        return None
    try:
        data_input.get_tokenizer(str(path))
    except data_input.DataError as e:
        print(f"note: {e}; data.tokenizer stays 'bytes'")
        return None
    return path


def _run_config(cfg: ModelConfig, run_dir: storage.Path, tokenizer: str,
                overrides: list[str]) -> Config:
    # Rows no longer than the learned position table; 128 tokens otherwise, as by default.
    data = DataConfig(tokenizer=tokenizer, seq_len=min(DataConfig.seq_len, cfg.max_positions))
    base = Config(model=cfg, data=data, run_dir=str(run_dir))
    config = configs.validate(apply_overrides(base, list(overrides)))
    changed = [line for line in model_mismatch(configs.to_dict(base), configs.to_dict(config))
               if line.split(":")[0].removeprefix("model.") not in FREE_MODEL_FIELDS]
    if changed:
        raise ConversionError("the model's shape comes from config.json; overrides may not "
                              "change it:\n  " + "\n  ".join(changed))
    if tokenizer == "bytes" and cfg.vocab_size < 258:
        print(f"note: vocab_size {cfg.vocab_size} is smaller than the byte tokenizer's 258; "
              "set data.tokenizer before training or sampling")
    return config


def _save_step_zero(config: Config, params: Params) -> None:
    """Parameters and a fresh optimizer state as step 0, through the run's own Checkpointer."""
    if config.model.scan_layers:
        params = model.stack_layers(params)
    tx = make_optimizer(config.optim, config.train.steps)
    # On the host CPU: the state (parameters and two moments) may not fit an accelerator.
    with jax.default_device(jax.devices("cpu")[0]):
        params = jax.tree.map(jnp.asarray, params)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params))
    ckpt = Checkpointer(checkpoint_dir(config.run_dir), config.checkpoint)
    try:
        ckpt.save(0, state, {"next_index": 0}, configs.to_dict(config))
        ckpt.wait()
    finally:
        ckpt.close()


def _tokenizer_of(data: DataConfig) -> tuple[int | None, storage.Path | None]:
    """End-of-text id of the run's tokenizer, and its tokenizer.json if it has one."""
    try:
        tokenizer = data_input.get_tokenizer(data.tokenizer)
    except (data_input.DataError, OSError) as e:
        print(f"note: tokenizer not loaded ({e}); config.json gets no eos_token_id")
        return None, None
    path = storage.path(data.tokenizer)
    return tokenizer.eos_id, path if path.suffix == ".json" else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf.convert",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="HF_DIR", help="a Hugging Face model directory")
    source.add_argument("--to-hf", metavar="RUN_DIR", help="one of our runs")
    parser.add_argument("--out", required=True, help="RUN_DIR (from-hf) or HF_DIR (to-hf)")
    parser.add_argument("--step", type=int, help="to-hf: checkpoint step (default: the latest)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="from-hf: settings of the written run, e.g. train.steps=200")
    args = parser.parse_args(argv)
    aftermath.install()  # a failed restore is reported once, not with its debris
    try:
        print(_convert(args))
    except (ConversionError, configs.ConfigError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _convert(args: argparse.Namespace) -> str:
    """Run the conversion the arguments ask for; what was written."""
    if args.to_hf:
        if args.overrides:
            raise ConversionError("key=value overrides are for --from-hf")
        return f"wrote {to_hf(args.to_hf, args.out, args.step)}/{{config.json,model.safetensors}}"
    if args.step is not None:
        raise ConversionError("--step is for --to-hf")
    m = from_hf(args.from_hf, args.out, args.overrides).model
    out = storage.path(args.out)
    return (f"wrote step 0 of {m.family} ({m.num_layers} layers, {m.embed_dim} wide, vocab "
            f"{m.vocab_size}) to {out}; fine-tune with `python -m train --config "
            f"{out / 'config.json'}`, sample with `python -m generate {out} --prompt ...`")


if __name__ == "__main__":
    sys.exit(main())
