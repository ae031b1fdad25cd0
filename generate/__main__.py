"""`python -m generate RUN_DIR --prompt "..."`: sample from a trained run's checkpoint."""

from __future__ import annotations

import argparse
import functools
import sys

import jax.numpy as jnp

import checkpoint
import configs
import input as data_input
import model
import sharding
import storage
from checkpoint import aftermath
from generate.loading import load
from generate.quantize import dequantize, nbytes, quantize_int8
from generate.sampler import Sampling, generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m generate", description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--prompt", action="append", default=[], help="repeat for a batch")
    parser.add_argument("--prompt-file", help="one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--quantize", choices=["int8"], help="weight-only int8 parameters")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. mesh.tensor=2")
    args = parser.parse_args(argv)
    aftermath.install()  # a failed restore is reported once, not with its debris
    try:
        prompts = args.prompt + _read_prompts(args.prompt_file)
        if not prompts:
            raise configs.ConfigError("give at least one --prompt or a --prompt-file")
        loaded = load(args.run_dir, args.step, args.overrides)
    except (configs.ConfigError, checkpoint.CheckpointError, sharding.MeshError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = loaded.config
    tokenizer = data_input.get_tokenizer(config.data.tokenizer)
    params, widen = loaded.params, None
    print(f"checkpoint step {loaded.step} of {args.run_dir}: parameters "
          f"{nbytes(params) / 2**20:.2f} MiB")
    if args.quantize:
        params = quantize_int8(params, model.logical_axes(config.model))
        widen = functools.partial(dequantize, dtype=jnp.dtype(config.model.dtype))
        print(f"int8 parameters {nbytes(params) / 2**20:.2f} MiB")
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    result = generate(params, tokenizer, prompts, config.model, sampling, loaded.mesh,
                      config.mesh.rules, dequantize=widen)
    for prompt, text in zip(prompts, result.texts, strict=True):
        print(f"--- {prompt!r}\n{prompt}{text}")
    print(f"prefill {result.prefill_tokens_per_s:,.0f} tokens/s | decode "
          f"{result.decode_tokens_per_s:,.0f} tokens/s | compiled in "
          f"{result.compile_seconds:.1f} s")
    return 0


def _read_prompts(path: str | None) -> list[str]:
    if path is None:
        return []
    return [line for line in storage.path(path).read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
