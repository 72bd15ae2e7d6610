"""Multi-host start-up: `jax.distributed.initialize`, a no-op on one host."""

from __future__ import annotations

import os

import jax


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins a multi-process job, or does nothing for a single process.

    Explicit arguments (or JAXRES_COORDINATOR / JAXRES_NUM_PROCESSES / JAXRES_PROCESS_ID) run
    a job by hand, e.g. on localhost; with none of them set, clusters that JAX detects itself
    (Cloud TPU, SLURM, Open MPI) are joined with `jax.distributed.initialize()` only when
    JAXRES_DISTRIBUTED=auto, so a laptop run never waits for a coordinator.
    """
    coordinator = coordinator or os.environ.get("JAXRES_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _env_int("JAXRES_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAXRES_PROCESS_ID")
    if coordinator is None and num_processes is None and process_id is None:
        if os.environ.get("JAXRES_DISTRIBUTED") == "auto":
            jax.distributed.initialize()
        return
    if coordinator is None or num_processes is None or process_id is None:
        raise ValueError(
            "a manual multi-process run needs all three of coordinator (host:port), num_processes and "
            f"process_id; got coordinator={coordinator!r}, num_processes={num_processes!r}, process_id={process_id!r}"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id must be in [0, num_processes); got process_id={process_id} with num_processes={num_processes}"
        )
    if num_processes > 1:
        jax.distributed.initialize(coordinator, num_processes, process_id)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
