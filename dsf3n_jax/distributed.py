"""The multi-controller runtime: ``jax.distributed.initialize`` from flags, config or env."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax


def cluster_of(environ: Mapping[str, str], *, tpu_vm: bool | None = None) -> str | None:
  """The launcher that started this process, whose environment JAX reads the topology from:
  ``"slurm"`` (inside ``srun`` with several tasks; an ``salloc`` shell or a one-task job is one
  process), ``"ompi"`` (``mpirun -n`` > 1), ``"tpu"`` (a GKE TPU pod, or a Cloud TPU VM whose
  metadata names its worker: ``tpu_vm``, default ``_on_cloud_tpu_vm()``); None: none (a
  single process, or flags for every setting)."""
  if "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ and _int(
      environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS"), 1) > 1:
    return "slurm"
  if _int(environ.get("OMPI_COMM_WORLD_SIZE"), 1) > 1:
    return "ompi"
  if any(k in environ for k in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                                "CLOUD_TPU_TASK_ID")):
    return "tpu"
  if _on_cloud_tpu_vm() if tpu_vm is None else tpu_vm:
    return "tpu"
  return None


def _int(value, default: int) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    return default


def _on_cloud_tpu_vm() -> bool:
  """A Cloud TPU VM, found as JAX's own cluster detection finds it: its TPU PCI devices (no
  environment variable is set in a plain ``gcloud ... ssh`` session; a machine without them
  stops here, with no network call), then its metadata server naming the VM's worker (a
  single-host TPU VM has one too: it then starts as a pod of one process). JAX has no public
  API for either: any failure of these internals counts as no TPU VM."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
    if not getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
      return False
    return any(cluster.is_env_present() for cluster in (cloud_tpu_cluster.GceTpuCluster,
                                                        cloud_tpu_cluster.GkeTpuCluster))
  except Exception:  # pylint: disable=broad-except
    return False


def slurm_local_device_ids(environ: Mapping[str, str]) -> list[int] | None:
  """The GPUs a SLURM task uses, where JAX's default is wrong; None: JAX's default.

  JAX gives each SLURM task the one GPU numbered ``SLURM_LOCALID`` among those it sees.
  That is right when every task sees all of its node's GPUs, but wrong when SLURM binds
  each task to its own GPU (``--gpu-bind=single:1``: the task sees one, numbered 0) and
  when one task per node drives all of them (it would use GPU 0 alone). So: a task that
  sees one GPU uses it; the only task on its node uses every GPU it sees.
  ``JAX_LOCAL_DEVICE_IDS`` set: JAX reads it.
  """
  visible = environ.get("CUDA_VISIBLE_DEVICES")
  if environ.get("JAX_LOCAL_DEVICE_IDS") or not visible:
    return None
  count = len([d for d in visible.split(",") if d.strip()])
  per_node = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_STEP_TASKS_PER_NODE")
  # "8", or "8(x2)" / "8,4": the first node's count (the same on every node for a pod job).
  tasks = _int(re.match(r"\d*", per_node or "").group(0), 0)
  # Bound GPUs (one, or --gpus-per-task's; fewer than the node's tasks: not shared), or the
  # node's only task: all it sees.
  if count == 1 or tasks == 1 or environ.get("SLURM_GPUS_PER_TASK") or 0 < count < tasks:
    return list(range(count))
  return None


def initialize(config, *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               environ: Mapping[str, str] | None = None, init=None,
               config_keys: bool = True, tpu_vm: bool | None = None) -> None:
  """Starts ``jax.distributed`` when the run spans several processes.

  Explicit arguments (command-line flags) win over ``config`` (a
  ``config.distributed`` block); with neither, JAX's own detection is used on
  Cloud TPU and under SLURM or Open MPI (``cluster_of``), and a plain
  single-process run skips initialisation. Outside such a launcher, the
  coordinator's ``host:port``, the process count and this process's id are all
  needed; a missing or malformed one is a ``SettingsError`` naming its flag.

  ``JAX_COORDINATOR_ADDRESS`` in the environment stands for the address (JAX reads only
  that). ``config_keys``: the messages name the ``config.distributed`` field beside each flag
  (False: a tool without a config). ``environ``, ``init`` (``jax.distributed.initialize``'s
  stand-in) and ``tpu_vm`` (``cluster_of``'s) are for tests.
  """
  environ = os.environ if environ is None else environ
  address = (coordinator_address or config.get("coordinator_address")
             or environ.get("JAX_COORDINATOR_ADDRESS") or None)
  n = num_processes if num_processes is not None else (config.get("num_processes") or None)
  pid = process_id if process_id is not None else config.get("process_id", -1)
  pid = None if pid is None or pid < 0 else pid
  cluster = cluster_of(environ, tpu_vm=tpu_vm)
  if address is None and n is None and pid is None and cluster is None:
    return
  if n == 1 and address is None and cluster is None:
    return
  _check(address, n, pid, cluster, config_keys=config_keys)
  kwargs = dict(coordinator_address=address, num_processes=n, process_id=pid,
                initialization_timeout=int(config.get("initialization_timeout", 300)))
  if cluster == "slurm" and (ids := slurm_local_device_ids(environ)) is not None:
    kwargs["local_device_ids"] = ids
  kwargs["heartbeat_timeout_seconds"] = int(config.get("heartbeat_timeout", 100))
  if init is not None:
    init(**kwargs)
    return
  # CPU devices of several processes talk over gloo; this leaves GPU/TPU alone.
  # (Asking for the backend here would start it before the runtime: it must not.)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  from dsf3n_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir_lib.log("topology: %d process(es), %d local / %d global device(s) (%s), mesh "
                  "data=%d%s", jax.process_count(), jax.local_device_count(),
                  jax.device_count(), jax.default_backend(), jax.device_count(),
                  f", launched by {cluster}" if cluster else "")


class SettingsError(ValueError):
  """A missing or malformed distributed setting (``initialize``), named by its flag."""


def _check(address: str | None, n: int | None, pid: int | None, cluster: str | None, *,
           config_keys: bool = True) -> None:
  """The explicit settings, and with no launcher to read the rest from, all three."""
  flags = tuple(f"--{k} (config.distributed.{k})" if config_keys else f"--{k}"
                for k in ("coordinator_address", "num_processes", "process_id"))
  if address is not None and not re.fullmatch(r"\[?[^\s\[\]]+\]?:\d{1,5}", address):
    raise SettingsError(f"--coordinator_address={address}: expected host:port of process 0, "
                        "e.g. 10.0.0.1:1234")
  if n is not None and pid is not None and not 0 <= pid < n:
    raise SettingsError(f"--process_id={pid}: expected 0 to {n - 1} (--num_processes={n})")
  missing = [f for f, v in zip(flags, (address, n, pid)) if v is None]
  if cluster is None and missing:
    raise SettingsError(f"{', '.join(missing)}: needed too, as no launcher (SLURM, Open MPI, "
                        "Cloud TPU) set them; give all three, or none for a single process")


def is_main_process() -> bool:
  return jax.process_index() == 0
