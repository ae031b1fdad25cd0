"""Compiled train steps saved whole, so that a restarted run skips tracing and lowering too.

JAX's persistent compilation cache skips XLA's compile, but to find its entry JAX must
trace and lower the step again: a good part of a warm restart on CPU, minutes for large
models. This cache keys the serialized executable by what determines the
program instead of by the program: the config fields the step is built from, the source
of the packages that build it, the library versions, the devices, and the compiler's
flags. Change any of them and the key changes, so a stale executable is never loaded;
an entry that cannot be loaded is reported and compiled again.

Single-process runs only: a multi-process executable spans every process's devices, and
JAX does not document reloading one. Entries are pickles, as trusted as the compilation
cache directory they live in.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import platform
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jaxlib
import optax
from jax.experimental import serialize_executable

# The packages whose code ends up in the compiled step.
STEP_PACKAGES = ("configs", "model", "sharding", "train")
# Config fields that steer the run around the step but never go into it.
_NOT_IN_STEP = {
    "": ("data", "checkpoint", "profile", "distributed", "run_dir"),
    "train": ("log_every", "eval_batches", "eval_every", "stop_after", "compile_cache",
              "compile_cache_dir"),
}
_ENVIRONMENT = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")
KEEP = 8
"""Entries kept per directory (newest first); each is one executable, ~1 MB on CPU."""


def step_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config (as `configs.to_dict` gives it) the compiled step depends on."""
    fields = {k: v for k, v in config.items() if k not in _NOT_IN_STEP[""]}
    fields["train"] = {k: v for k, v in config["train"].items() if k not in _NOT_IN_STEP["train"]}
    fields["seq_len"] = config["data"]["seq_len"]
    return fields


def key(config: dict[str, Any], devices: Sequence[jax.Device]) -> str:
    """A digest of everything that determines the compiled step on `devices`."""
    described = {
        "config": step_fields(config),
        "source": source_digest(),
        "versions": [jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__],
        "devices": [(d.id, d.platform, d.device_kind, d.process_index) for d in devices],
        "platform_version": devices[0].client.platform_version,
        "host": _host(devices[0].platform),
        "environment": [_flags(os.environ.get(name, ""), devices[0].platform)
                        for name in _ENVIRONMENT],
        "jax_config": {k: repr(v) for k, v in sorted(jax.config.values.items())
                       if not k.startswith(_WHERE_NOT_WHAT)},
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def source_digest(packages: Sequence[str] = STEP_PACKAGES,
                  root: pathlib.Path | None = None) -> str:
    """sha256 over the Python files of `packages` (under the project root by default)."""
    root = root or pathlib.Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def load(directory: pathlib.Path, digest: str, devices: Sequence[jax.Device],
         report: Callable[[str], None]) -> Any | None:
    """The saved step for `digest`, or None if there is none or it cannot be loaded."""
    path = directory / f"{digest}.pkl"
    try:
        serialized, in_tree, out_tree = pickle.loads(path.read_bytes())
        compiled = serialize_executable.deserialize_and_load(
            serialized, in_tree, out_tree, backend=devices[0].client, execution_devices=devices)
        os.utime(path)  # recently used: the last to be pruned
        return compiled
    except FileNotFoundError:
        return None
    except Exception as e:  # a cache must never stop a run: compile instead
        report(f"saved train step {path} could not be loaded ({type(e).__name__}: {e}); "
               "compiling it again")
        return None


def save(directory: pathlib.Path, digest: str, compiled: Any,
         report: Callable[[str], None]) -> None:
    """Write the step atomically (a killed run leaves no half entry); keep the newest KEEP.

    Only a step compiled in this process may be saved: on XLA:CPU an executable that came
    from the compilation cache serializes without its kernels, and loading it fails
    only when it runs ("Function ... not found").
    """
    try:
        entry = pickle.dumps(serialize_executable.serialize(compiled))
    except (ValueError, NotImplementedError) as e:  # a backend without serialization
        report(f"the compiled train step cannot be saved on this backend ({e})")
        return
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f"{digest}.{os.getpid()}.tmp"
    partial.write_bytes(entry)
    partial.replace(directory / f"{digest}.pkl")
    for old in sorted(directory.glob("*.pkl"), key=_last_used, reverse=True)[KEEP:]:
        old.unlink(missing_ok=True)


def _last_used(path: pathlib.Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # pruned meanwhile by another run sharing the directory
        return 0.0


# JAX settings that say where a program runs and is cached, not what it is: a TPU step
# compiled ahead of time on a CPU host (`python -m train.aot --save`) has the host's.
_WHERE_NOT_WHAT = ("jax_platform", "jax_compilation_cache", "jax_persistent_cache",
                   "jax_raise_persistent_cache_errors", "jax_explain_cache_misses",
                   "jax_num_cpu_devices", "jax_cuda_visible_devices", "jax_rocm_visible_devices",
                   "jax_oneapi_visible_devices", "jax_default_device")


def _host(backend: str) -> list[str]:
    """Code compiled for one CPU may not run on another; a TPU or GPU program does not run
    on the host's CPU, wherever it was compiled."""
    return [platform.machine(), _cpu_flags()] if backend == "cpu" else []


def _flags(flags: str, backend: str) -> str:
    """XLA_FLAGS as they bear on `backend`'s programs: XLA:CPU's own flags and the count
    of host devices do not change a TPU or GPU program."""
    if backend == "cpu":
        return flags
    return " ".join(f for f in flags.split()
                    if not f.startswith(("--xla_cpu", "--xla_force_host_platform")))


def _cpu_flags() -> str:
    """The CPU's feature flags: code compiled for one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()
