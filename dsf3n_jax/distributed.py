"""The multi-controller runtime: ``jax.distributed.initialize`` from flags, config or env."""

from __future__ import annotations

import os

import jax
from absl import logging


def initialize(config, *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> None:
  """Starts ``jax.distributed`` when the run spans several processes.

  Explicit arguments (command-line flags) win over ``config`` (a
  ``config.distributed`` block); with neither, JAX's own detection is used on
  Cloud TPU and under SLURM or Open MPI, and a plain single-process run skips
  initialisation.
  """
  address = coordinator_address or config.get("coordinator_address") or None
  n = num_processes if num_processes is not None else (config.get("num_processes") or None)
  pid = process_id if process_id is not None else config.get("process_id", -1)
  pid = None if pid is None or pid < 0 else pid
  auto = any(k in os.environ for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                                       "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID"))
  if address is None and n is None and not auto:
    return
  if n == 1 and address is None:
    return
  kwargs = dict(coordinator_address=address, num_processes=n, process_id=pid,
                initialization_timeout=int(config.get("initialization_timeout", 300)))
  # CPU devices of several processes talk over gloo; this leaves GPU/TPU alone.
  # (Asking for the backend here would start it before the runtime: it must not.)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  heartbeat = int(config.get("heartbeat_timeout", 100))
  try:
    jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=heartbeat)
  except TypeError:  # older jax without the heartbeat argument
    jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def is_main_process() -> bool:
  return jax.process_index() == 0
