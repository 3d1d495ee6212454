"""Multi-host start-up: one place that decides how JAX processes find each other.

TPU pods and SLURM jobs are detected by `jax.distributed.initialize()` itself; an explicit
coordinator (address, process count, id) covers everything else, including N processes on
one CPU host, which is how the multi-process tests run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax


@dataclass(frozen=True)
class ClusterSpec:
    """How to join the job; empty fields mean "detect from the environment"."""

    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1


def _in_managed_cluster() -> bool:
    """True inside a multi-task SLURM step or on a multi-host Cloud TPU VM."""
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return slurm_tasks > 1 or "," in tpu_hosts


def initialize(spec: ClusterSpec = ClusterSpec()) -> None:
    """Joins the distributed job once; a single process on one host needs no coordinator."""
    if jax.distributed.is_initialized():
        return
    if spec.coordinator_address:
        if spec.num_processes < 1 or spec.process_id < 0:
            raise ValueError(
                "an explicit coordinator needs num_processes >= 1 and process_id >= 0, got "
                f"num_processes={spec.num_processes}, process_id={spec.process_id}"
            )
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            # Cross-process collectives on CPU need gloo; GPUs and TPUs bring their own.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
        )
    elif _in_managed_cluster():
        jax.distributed.initialize()
