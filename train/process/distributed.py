"""Join a multi-process (multi-host) JAX job before anything touches a device.

`jax.distributed.initialize` must run before the first JAX call that starts a
backend: afterwards every process would see only its own devices and train a
model of its own. So `python -m train` calls `initialize` first thing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

from configs.schema import DistributedConfig


def initialize(cfg: DistributedConfig) -> None:
    """Connect this process to the others of its job; nothing for a single-process run.

    With `cfg.coordinator_address` the job is described by the config. Without
    it, a launcher JAX can read the job from (a multi-host TPU slice, SLURM's
    `srun`, Open MPI's `mpirun`) is detected from the environment and JAX asks it.
    Calling this again once initialised does nothing.
    """
    if jax.distributed.is_initialized():
        return
    if cfg.coordinator_address:
        # Cross-process collectives on CPU need gloo; GPU and TPU ignore the setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                                   num_processes=cfg.num_processes, process_id=cfg.process_id)
    elif detect_launcher(os.environ) is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()


def detect_launcher(env: Mapping[str, str]) -> str | None:
    """`tpu`, `slurm` or `ompi` if `env` belongs to a process of such a multi-process job.

    Only launchers that JAX's own cluster detection reads are named, and only when
    they start more than one process: a one-task SLURM or MPI job runs alone, with
    no coordinator port to open.
    """
    if _tpu_hosts(env) > 1 or _count(env, "MEGASCALE_NUM_SLICES") > 1:
        return "tpu"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if all(name in env for name in slurm) and _count(env, "SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _count(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    return None


def _tpu_hosts(env: Mapping[str, str]) -> int:
    """Workers of this TPU slice, as GKE and multi-host TPU VMs list them."""
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    return len([host for host in hosts.split(",") if host.strip()])


def _count(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env.get(name, "0"))
    except ValueError:
        return 0
