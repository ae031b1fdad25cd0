"""`python -m train.aot --topology SLICE [--slices N] [--config PRESET_OR_FILE] [--save DIR]
[key=value ...]`: compile the train and eval steps for a TPU slice on this host, no TPU needed.

Before renting a slice: does the config fit a chip's HBM, how long does XLA take, and how
much does a step move between chips against the time its FLOPs take? SLICE is a Cloud TPU
accelerator type (`v5e-256`, `v5litepod-16`, `v5p-128`, `v4-32`, `v6e-64`) or JAX's topology
name (`v5e:16x16`); `--slices 2` compiles for two such slices joined by the data-centre
network (set `mesh.dcn_data` or `mesh.dcn_fsdp`). A step that does not fit is refused with
what to change, each suggestion compiled here to say whether it fits. `--save DIR` writes
the train step for `python -m train train.compile_cache_dir=DIR` on that slice to load
without tracing (single-host slices: saved steps are for single-process runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import sys
import time
from typing import Any

# This host compiles for the slice's devices, described by libtpu; its own backend is the
# CPU, which keeps libtpu from looking for a TPU here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from train import process  # noqa: E402

with process.started():  # as `python -m train` sets up its process
    import jax

    import configs
    import sharding
    from configs.schema import Config
    from observe import flops
    from sharding import topology
    from train.compile import chips, executables
    from train.compile.communication import Communication, communication
    from train.compile.step import (
        BATCH_DTYPES,
        OutOfMemory,
        StepMemory,
        check_fits,
        compile_or_refuse,
        compile_train_step,
        step_memory,
    )
    from train.optimizer import make_optimizer
    from train.state import state_target
    from train.step import eval_step

GIB = 2.0 ** 30
USER_ERRORS = (configs.ConfigError, sharding.MeshError, topology.TopologyError)


@dataclasses.dataclass
class SliceCompile:
    """The train and eval steps of a config compiled for a slice, and what they need."""

    config: Config
    """Validated, `auto` resolved for TPU."""
    mesh: jax.sharding.Mesh
    tpu_slice: topology.Slice
    slices: int
    train: Any
    """The compiled train step."""
    train_seconds: float
    memory: StepMemory
    eval_memory: StepMemory | None
    eval_seconds: float
    communication: Communication

    @property
    def chip(self) -> chips.Chip:
        return chips.chip(self.tpu_slice)

    @property
    def chips(self) -> int:
        return self.mesh.devices.size

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.mesh.devices.flat})

    def flop_seconds(self) -> float:
        """A step's model FLOPs on one chip at the chip's bf16 peak."""
        seq_len = self.config.data.seq_len
        tokens = self.config.train.batch_size * seq_len
        step_flops = flops.flops_per_token(self.config.model, seq_len) * tokens
        return step_flops / self.chips / self.chip.peak_flops


def prepare(config: Config, tpu_slice: topology.Slice, slices: int = 1,
            ) -> tuple[Config, jax.sharding.Mesh]:
    """The config as `python -m train` resolves it on the slice, and the mesh over it."""
    config = configs.validate(config)
    mesh = sharding.make_mesh(config.mesh, chips.devices(tpu_slice, slices))
    config = dataclasses.replace(config, model=configs.resolve_auto(config.model, "tpu"))
    sharding.check_batch(config, mesh)
    return config, mesh


def compile_for_slice(config: Config, tpu_slice: topology.Slice,
                      slices: int = 1) -> SliceCompile:
    """Compile the steps; `OutOfMemory` if either cannot fit a chip's usable HBM."""
    config, mesh = prepare(config, tpu_slice, slices)
    tx = make_optimizer(config.optim, config.train.steps)
    target = state_target(config, mesh, tx)
    step = compile_train_step(config, mesh, tx, target, report=lambda _: None)
    usable = chips.chip(tpu_slice).usable_bytes
    check_fits(step.memory, usable)
    started = time.perf_counter()
    evaluate = compile_or_refuse(_lower_eval(config, mesh, target.params))
    eval_seconds = time.perf_counter() - started
    eval_memory = step_memory(evaluate)
    if eval_memory is not None:
        check_fits(eval_memory, usable)
    traffic = communication(step.fn, chips.slice_of_device(list(mesh.devices.flat)))
    return SliceCompile(config, mesh, tpu_slice, slices, step.fn, step.seconds, step.memory,
                        eval_memory, eval_seconds, traffic)


def _lower_eval(config: Config, mesh: jax.sharding.Mesh, params: Any) -> jax.stages.Lowered:
    """The eval step as `train.evaluation.Evaluator` jits it, on a batch of the train shape;
    `params`: their shapes and shardings."""
    batch_sharding = sharding.batch_sharding(mesh, config.mesh.rules)
    jitted = jax.jit(functools.partial(eval_step, cfg=config.model),
                     in_shardings=(sharding.shardings_of(params), batch_sharding))
    shape = (config.train.batch_size, config.data.seq_len)
    batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
             for name, dtype in BATCH_DTYPES.items()}
    with sharding.use_rules(mesh, config.mesh.rules):
        return jitted.lower(params, batch)


@dataclasses.dataclass(frozen=True)
class Suggestion:
    overrides: tuple[str, ...]
    fits: bool
    outcome: str
    """GiB a chip when it fits; why not otherwise."""


def suggestions(name: str | None, overrides: list[str], tpu_slice: topology.Slice,
                slices: int = 1) -> list[Suggestion]:
    """What to change so the step fits, best first (the cheapest in speed first): recompute
    activations, shard over more chips, split the batch, a smaller batch; each compiled.
    When none fits alone, all of them together."""
    config, mesh = prepare(configs.load(name, overrides), tpu_slice, slices)
    tried = []
    for group in _candidates(config, mesh):
        for change in group:  # the smallest change of its kind that fits
            tried.append(_try(name, overrides, change, tpu_slice, slices))
            if tried[-1].fits:
                break
    if tried and not any(s.fits for s in tried):
        together = tuple(dict.fromkeys(o for s in tried for o in s.overrides))
        tried.append(_try(name, overrides, together, tpu_slice, slices))
    return tried


def _candidates(config: Config, mesh: jax.sharding.Mesh) -> list[list[tuple[str, ...]]]:
    groups: list[list[tuple[str, ...]]] = []
    if config.model.remat != "full":
        groups.append([("model.remat=full",)])
    per_slice = mesh.devices.size // (config.mesh.dcn_data * config.mesh.dcn_fsdp)
    if mesh.shape["fsdp"] // config.mesh.dcn_fsdp < per_slice // mesh.shape["tensor"]:
        groups.append([("mesh.data=1", "mesh.fsdp=-1")])
    ways = sharding.batch_ways(mesh, config.mesh.rules)
    batch, parts = config.train.batch_size, config.train.microbatches
    more_parts = [parts * k for k in (2, 4, 8) if batch % (ways * parts * k) == 0]
    groups.append([(f"train.microbatches={m}",) for m in more_parts])
    smaller = [batch // k for k in (2, 4, 8)
               if batch % k == 0 and batch // k and (batch // k) % (ways * parts) == 0]
    groups.append([(f"train.batch_size={b}",) for b in smaller])
    return [g for g in groups if g]


def _try(name: str | None, overrides: list[str], change: tuple[str, ...],
         tpu_slice: topology.Slice, slices: int) -> Suggestion:
    try:
        compiled = compile_for_slice(configs.load(name, [*overrides, *change]), tpu_slice, slices)
    except OutOfMemory as e:
        return Suggestion(change, False, f"does not fit: {_short(e)}")
    except USER_ERRORS as e:
        return Suggestion(change, False, f"not possible here: {e}")
    return Suggestion(change, True, f"fits: {compiled.memory.total / GIB:.2f} GiB a chip")


def _short(error: Exception) -> str:
    reason = str(error).split("; shard more", 1)[0].removeprefix("the train step ")
    return reason.removeprefix("does not fit: ")


def describe(result: SliceCompile) -> list[str]:
    """The report `python -m train.aot` prints."""
    chip, memory = result.chip, result.memory
    config = result.config
    rows = config.train.batch_size * config.data.seq_len
    name = result.tpu_slice.accelerator_type + (f" x {result.slices} slices"
                                                if result.slices > 1 else "")
    lines = [
        f"slice: {name} ({result.tpu_slice.topology_name}): {result.chips} chips on "
        f"{result.hosts} host(s)",
        f"layout: mesh {dict(result.mesh.shape)}; batch {config.train.batch_size} x "
        f"{config.data.seq_len} tokens ({rows / result.chips:,.0f} tokens a chip), "
        f"microbatches {config.train.microbatches}, remat {config.model.remat}, attention "
        f"{config.model.attention}, {config.model.dtype}",
        f"memory a chip: arguments {_size(memory.arguments)}, temporaries "
        f"{_size(memory.temporaries)}, outputs {_size(memory.outputs)} "
        f"({_size(memory.aliased)} of them in donated arguments), total "
        f"{memory.total / GIB:.2f} GiB of {chip.usable_bytes / GIB:.2f} GiB usable "
        f"({chip.hbm_bytes / GIB:.0f} GiB HBM): fits",
    ]
    if result.eval_memory is not None:
        lines.append(f"eval step memory a chip: total {_size(result.eval_memory.total)}")
    lines.append(f"compile time here: train step {result.train_seconds:.1f} s, eval step "
                 f"{result.eval_seconds:.1f} s")
    lines += describe_communication(result.communication, chip, result.flop_seconds())
    return lines


def describe_communication(traffic: Communication, chip: chips.Chip,
                           flop_seconds: float) -> list[str]:
    lines = ["communication a chip a step (each op times its loops' trips):"]
    for network, bandwidth in (("ici", chip.ici_bytes_per_s), ("dcn", chip.dcn_bytes_per_s)):
        kinds = [f"{kind} {t.count} x = {_size(t.bytes)}"
                 for kind, t in getattr(traffic, network).items() if t.count]
        total = traffic.total(network)
        if not kinds and network == "dcn":
            continue
        lines.append(f"  {network.upper()}: " + ("; ".join(kinds) or "none"))
        lines.append(f"  {network.upper()} total {_size(total.bytes)}, "
                     f"{_size(total.sent_bytes)} sent: "
                     f"{traffic.seconds(network, bandwidth) * 1e3:.1f} ms at "
                     f"{bandwidth / 1e9:.1f} GB/s")
    lines.append(f"  FLOPs a chip a step: {flop_seconds * 1e3:.1f} ms at the bf16 peak "
                 f"({chip.peak_flops / 1e12:.0f} TFLOP/s)")
    return lines


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def save(result: SliceCompile, directory: pathlib.Path) -> pathlib.Path:
    """Write the train step where `python -m train train.compile_cache_dir=DIR` on the slice
    looks for it."""
    if result.hosts > 1:
        raise configs.ConfigError(
            f"--save: {result.tpu_slice.accelerator_type} spans {result.hosts} hosts, and "
            "saved train steps are loaded by single-process runs only (a slice of one host)")
    devices = list(result.mesh.devices.flat)
    digest = executables.key(configs.to_dict(result.config), devices)
    folder = directory / "train_steps"
    problems: list[str] = []
    executables.save(folder, digest, result.train, problems.append)
    if problems:
        raise configs.ConfigError(f"--save: {problems[0]}")
    return folder / f"{digest}.pkl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.aot",
        description="Compile the train and eval steps for a TPU slice, here, without a TPU.")
    parser.add_argument("--topology", required=True,
                        help="v5e-256, v5litepod-16, v5p-128, v4-32, v6e-64 or v5e:16x16")
    parser.add_argument("--slices", type=int, default=1, help="slices joined over DCN")
    parser.add_argument("--config", default=None,
                        help="preset name or JSON config file (default: tiny)")
    parser.add_argument("--save", type=pathlib.Path, default=None, metavar="DIR",
                        help="write the train step for python -m train "
                             "train.compile_cache_dir=DIR to load")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config fields, e.g. model.remat=full mesh.fsdp=-1")
    args = parser.parse_args(argv)
    try:
        if args.slices < 1:
            raise configs.ConfigError(f"--slices must be at least 1, not {args.slices}")
        tpu_slice = topology.parse(args.topology)
        config = configs.load(args.config, args.overrides)
        try:
            result = compile_for_slice(config, tpu_slice, args.slices)
        except OutOfMemory as e:
            print(f"error: {e}", file=sys.stderr)
            print(_refusal(args, tpu_slice), file=sys.stderr)
            return 2
        print("\n".join(describe(result)))
        if args.save:
            path = save(result, args.save)
            print(f"saved the train step: {path}; on the slice run python -m train "
                  f"train.compile_cache_dir={args.save} with the same config")
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _refusal(args: argparse.Namespace, tpu_slice: topology.Slice) -> str:
    found = suggestions(args.config, args.overrides, tpu_slice, args.slices)
    if not found:
        return "nothing left to change in this layout: a larger slice is needed"
    width = max(len(" ".join(s.overrides)) for s in found)
    lines = ["what to change, best first (each compiled here for this slice):"]
    lines += [f"  {n}. {' '.join(s.overrides):<{width}}  {s.outcome}"
              for n, s in enumerate(found, 1)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
