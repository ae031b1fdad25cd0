"""Reference benchmark: this stack against a PyTorch eager trainer on the same work.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/reference.py [--steps 1500] [--chunk 50]
        [--eval-at 500,1000,1500] [--quick]

A GPT-2-shaped model (4 layers, width 128, 4 heads, tied embeddings, the byte tokenizer's
vocabulary of 258, float32) trained for 1500 steps of 16 x 128 tokens on the default
corpus, with AdamW (lr 1e-3, betas 0.9/0.99, weight decay 0.1, clipping at 1.0, 100
warmup steps, cosine to 1e-4 at step 1500), by two trainers from the same initial
parameters on the same batches in the same order: this stack's compiled step (as
`train.run` compiles it, on one CPU device) and benchmarks/torch_reference.py's
ReferenceTrainer (Hugging Face GPT2LMHeadModel + torch.optim.AdamW, eager).

The two take turns, a chunk of steps each (ours, then theirs), so that whatever else the
machine does during the run falls on both alike. A chunk's time is the wall time of its
steps alone: the batches are read from the dataset before it, and ours is waited for at
its end. Tokens/s is the median over chunks; compilation happens before the first chunk
and is reported on its own. Held-out loss is measured on every held-out row of the
corpus, by the same batches for both, between chunks (not timed).
"""

from __future__ import annotations

import os

# Before torch loads its OpenMP runtime: by default its idle worker threads spin-wait for
# the next parallel region, so while our turn runs they keep burning the cores XLA's own
# thread pool needs (and ours are then measured on a busy machine). Passive: they sleep.
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from train import process  # noqa: E402

with process.started() as KEPT:  # as `python -m train` sets up its process
    import jax
    import numpy as np
    import torch

    import configs
    import input as data_input
    import model
    import sharding
    from benchmarks.torch_reference import ReferenceTrainer
    from train import state as train_state
    from train.compile.step import compile_train_step
    from train.optimizer import make_optimizer
    from train.step import eval_step

Batch = dict[str, np.ndarray]

RUN = ["model.family=gpt2", "model.num_layers=4", "model.embed_dim=128", "model.num_heads=4",
       # head_dim (32), kv heads (4) and MLP width (512) are the family's: `tiny` sets
       # its own MLP width, set back to the derived one here.
       "model.head_dim=none", "model.num_kv_heads=none", "model.mlp_dim=none",
       "model.tie_embeddings=true", "model.dtype=float32", "data.path=", "data.seq_len=128",
       "train.batch_size=16", "optim.learning_rate=1e-3", "optim.beta1=0.9", "optim.beta2=0.99",
       "optim.weight_decay=0.1", "optim.grad_clip=1.0", "optim.warmup_steps=100",
       "optim.schedule=cosine", "optim.min_lr=1e-4", "optim.decay_steps=1500", "seed=0",
       "mesh.data=1", "train.compile_cache=false"]
LOSS_TARGET = 0.02
"""Largest difference of held-out loss at equal steps (nats) that counts as the same."""
SPEED_TARGET = 1.0
"""Least tokens/s of ours over theirs that counts as met."""


def load_config(steps: int) -> configs.Config:
    tokenizer = data_input.get_tokenizer("bytes")
    config = configs.load("tiny", [*RUN, f"model.vocab_size={tokenizer.vocab_size}",
                                   f"train.steps={steps}"])
    return configs.validate(config)


class Ours:
    """This stack's step as `train.run` compiles and feeds it, on one device."""

    def __init__(self, config: configs.Config, device: jax.Device):
        self.mesh = sharding.make_mesh(config.mesh, [device])
        self.config = dataclasses.replace(
            config, model=configs.resolve_auto(config.model, device.platform))
        tx = make_optimizer(self.config.optim, self.config.train.steps)
        target = train_state.state_target(self.config, self.mesh, tx)
        self.state = jax.jit(functools.partial(train_state.init_state, self.config, tx),
                             out_shardings=sharding.shardings_of(target))()
        compiled = compile_train_step(self.config, self.mesh, tx, target, report=lambda _: None)
        self.step_fn, self.compile_seconds = compiled.fn, compiled.seconds
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.config.mesh.rules)
        self.evaluate_fn = jax.jit(self._eval_step, in_shardings=(
            sharding.shardings_of(target.params), self.batch_sharding))

    def _eval_step(self, params, batch):
        with sharding.use_rules(self.mesh, self.config.mesh.rules):
            return eval_step(params, batch, cfg=self.config.model)

    def train(self, batches: list[Batch]) -> tuple[list[float], float]:
        """Losses of the batches' steps, and the wall seconds of those steps.

        Steps are dispatched without waiting, as the loop does; the losses are fetched
        once the chunk's last step has finished (the loop fetches each one step late).
        """
        started = time.perf_counter()
        metrics = []
        for batch in batches:
            self.state, step_metrics = self.step_fn(
                self.state, sharding.to_global(batch, self.batch_sharding))
            metrics.append(step_metrics["loss"])
        jax.block_until_ready((self.state, metrics))
        seconds = time.perf_counter() - started
        return [float(loss) for loss in jax.device_get(metrics)], seconds

    def evaluate(self, batches: list[Batch]) -> float:
        """Token-weighted mean held-out loss, as `train.loop._evaluate` computes it."""
        loss_sum = tokens = 0.0
        for batch in batches:
            out = jax.device_get(self.evaluate_fn(
                self.state.params, sharding.to_global(batch, self.batch_sharding, whole=True)))
            loss_sum += float(out["loss_sum"])
            tokens += float(out["tokens"])
        return loss_sum / max(tokens, 1.0)


class Theirs:
    """ReferenceTrainer with the same interface as Ours."""

    def __init__(self, config: configs.Config, params: Any):
        self.trainer = ReferenceTrainer(config, params)

    def train(self, batches: list[Batch]) -> tuple[list[float], float]:
        started = time.perf_counter()
        losses = [self.trainer.step(batch) for batch in batches]
        return losses, time.perf_counter() - started

    def evaluate(self, batches: list[Batch]) -> float:
        return self.trainer.evaluate(batches)


def chunk_ends(steps: int, chunk: int, eval_at: list[int]) -> list[int]:
    """The last step of each chunk: every `chunk` steps, and cut at each evaluation."""
    return sorted({*range(chunk, steps, chunk), *[s for s in eval_at if s < steps], steps})


def initial_params(ours: Ours) -> Any:
    """A host copy of our initial parameters, for the reference trainer to start from.

    They are `model.init_params(config.model, config.seed)` computed under jit, as
    `train.run` creates them; computed eagerly they can differ in the last bit.
    """
    params = jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(ours.state.params))
    eager = model.init_params(ours.config.model, ours.config.seed)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--chunk", type=int, default=50, help="steps per turn of each trainer")
    parser.add_argument("--eval-at", default="500,1000,1500",
                        help="steps after which both measure held-out loss")
    parser.add_argument("--quick", action="store_true",
                        help="100 steps in chunks of 25, held-out loss at 50 and 100")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.chunk, args.eval_at = 100, 25, "50,100"
    eval_at = sorted(int(s) for s in args.eval_at.split(",") if s)
    if any(not 0 < s <= args.steps for s in eval_at):
        parser.error(f"--eval-at steps must lie in 1..{args.steps}")

    torch.set_num_threads(os.cpu_count())
    config = load_config(args.steps)
    tokenizer = data_input.get_tokenizer(config.data.tokenizer)
    sources = data_input.data_sources(config.data, tokenizer)
    (train_source,) = sources.train
    # As `train.run` builds them: batch k is the one its step k + 1 trains on.
    dataset = data_input.train_dataset(train_source.rows, seed=config.seed,
                                       global_batch=config.train.batch_size)
    heldout = [batch for source in sources.heldout
               for batch in data_input.eval_batches(source.rows, config.train.batch_size, -1)]
    heldout_rows = sum(len(source.rows) for source in sources.heldout)

    device = jax.devices("cpu")[0]
    ours = Ours(config, device)
    params = initial_params(ours)
    theirs = Theirs(ours.config, params)
    trainers = {"ours": ours, "theirs": theirs}
    m = ours.config.model
    tokens_per_step = config.train.batch_size * config.data.seq_len
    print(f"host memory kept between steps: {KEPT}")
    print(f"model: {m.family}, {m.num_layers} layers, width {m.embed_dim}, {m.num_heads} heads "
          f"x {m.head_dim}, {m.num_kv_heads} kv heads, MLP {m.mlp_dim}, vocab {m.vocab_size}, "
          f"tied {m.tie_embeddings}, {m.dtype}, "
          f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters")
    print(f"run: {args.steps} steps of {config.train.batch_size} x {config.data.seq_len} "
          f"tokens, chunks of {args.chunk} steps, held-out loss at {eval_at}")
    print(f"ours: 1 {device.platform} device ({jax.device_count()} visible), train step "
          f"compiled in {ours.compile_seconds:.1f} s | theirs: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads | OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')} | {os.cpu_count()} CPUs", flush=True)

    losses: dict[str, list[float]] = {name: [] for name in trainers}
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    evals: dict[str, dict[int, float]] = {name: {} for name in trainers}
    done = 0
    for end in chunk_ends(args.steps, args.chunk, eval_at):
        batches = [dataset[k] for k in range(done, end)]
        line = f"steps {done + 1:5d}-{end:5d}"
        for name, trainer in trainers.items():
            chunk_losses, seconds = trainer.train(batches)
            losses[name] += chunk_losses
            rates[name].append(len(batches) * tokens_per_step / seconds)
            line += f" | {name} {rates[name][-1]:8,.0f} tok/s loss {chunk_losses[-1]:.4f}"
        done = end
        if end in eval_at:
            for name, trainer in trainers.items():
                evals[name][end] = trainer.evaluate(heldout)
            line += (f" | held-out ours {evals['ours'][end]:.4f} "
                     f"theirs {evals['theirs'][end]:.4f}")
        print(line, flush=True)

    report(losses, rates, evals, eval_at, heldout_rows, len(heldout), ours.compile_seconds)


def report(losses: dict[str, list[float]], rates: dict[str, list[float]],
           evals: dict[str, dict[int, float]], eval_at: list[int], heldout_rows: int,
           heldout_batches: int, compile_seconds: float) -> None:
    speed = {name: statistics.median(values) for name, values in rates.items()}
    rows = [("loss at step 1", f"{losses['theirs'][0]:.4f}", f"{losses['ours'][0]:.4f}")]
    rows += [(f"held-out loss at step {step}", f"{evals['theirs'][step]:.4f}",
              f"{evals['ours'][step]:.4f}") for step in eval_at]
    rows += [(f"tokens/s (median of {len(rates['ours'])} chunks)", f"{speed['theirs']:,.0f}",
              f"{speed['ours']:,.0f}"),
             ("compile time of the train step", "-", f"{compile_seconds:.1f} s")]
    width = max(len(row[0]) for row in rows)
    print(f"\nheld-out: all {heldout_rows} held-out rows of the default corpus "
          f"({heldout_batches} batches, the last filled with zero-weight rows)")
    print(f"| {'':<{width}} | {'PyTorch reference':>17} | {'this stack':>10} |")
    print(f"|{'-' * (width + 2)}|{'-' * 19}|{'-' * 12}|")
    for label, theirs, mine in rows:
        print(f"| {label:<{width}} | {theirs:>17} | {mine:>10} |")
    ratio = speed["ours"] / speed["theirs"]
    gaps = {step: abs(evals["ours"][step] - evals["theirs"][step]) for step in eval_at}
    worst = max(gaps.values())
    print("\nheld-out loss |ours - theirs| at equal steps: "
          + ", ".join(f"step {step} {gap:.4f}" for step, gap in gaps.items())
          + f" (target <= {LOSS_TARGET}): {'met' if worst <= LOSS_TARGET else 'not met'}")
    print(f"tokens/s ours / theirs = {ratio:.2f} (target >= {SPEED_TARGET}): "
          f"{'met' if ratio >= SPEED_TARGET else 'not met'}")
    print("tokens/s per chunk, ours: " + ", ".join(f"{r:,.0f}" for r in rates["ours"]))
    print("tokens/s per chunk, theirs: " + ", ".join(f"{r:,.0f}" for r in rates["theirs"]))


if __name__ == "__main__":
    main()
