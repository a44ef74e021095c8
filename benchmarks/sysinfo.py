"""What a benchmark result depends on: machine, library versions, threads, allocator, load.

Everything here reads the running process and its host; nothing is changed.
``allocator_env`` builds the environment that selects a memory allocator for a
child process (jemalloc through ``LD_PRELOAD``, or glibc's transparent huge
pages through ``GLIBC_TUNABLES``).
"""

from __future__ import annotations

import datetime
import glob
import importlib.metadata
import os
import platform
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

ALLOCATORS = ("default", "jemalloc", "hugetlb")
_JEMALLOC_GLOBS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so*", "/usr/lib/aarch64-linux-gnu/"
                   "libjemalloc.so*", "/usr/lib64/libjemalloc.so*", "/usr/lib/libjemalloc.so*",
                   "/usr/local/lib/libjemalloc.so*")
_PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu", "flax", "optax",
             "numpy", "scipy", "scikit-learn", "torch", "psutil", "dsf3n_jax")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "TF_NUM_INTEROP_THREADS", "TF_NUM_INTRAOP_THREADS", "XLA_FLAGS",
                "LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF", "JAX_PLATFORMS")


def cpu_model() -> str:
  """The CPU's model name from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
  """The CPU features that matter for matrix products (AVX-512, bf16, AMX)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          flags = line.split(":", 1)[1].split()
          return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f",
                                                           "avx2", "fma", "avx512_vnni")))
  except OSError:
    pass
  return []


def memory_bytes() -> int | None:
  """Total host memory in bytes."""
  try:
    import psutil
    return int(psutil.virtual_memory().total)
  except ImportError:
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
      return None


def usable_cores() -> int:
  """Cores this process may run on (affinity), else ``os.cpu_count()``."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def versions() -> dict[str, str]:
  """Installed versions of the libraries the figures depend on."""
  out = {"python": platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return out


def thread_settings() -> dict[str, Any]:
  """Environment variables that set threads or the allocator, and torch's thread counts."""
  out: dict[str, Any] = {k: os.environ.get(k) for k in _THREAD_VARS}
  if "torch" in sys.modules:
    torch = sys.modules["torch"]
    out["torch.get_num_threads"] = torch.get_num_threads()
    out["torch.get_num_interop_threads"] = torch.get_num_interop_threads()
  return out


def jemalloc_path() -> str | None:
  """The path of an installed ``libjemalloc.so``, or None."""
  for pattern in _JEMALLOC_GLOBS:
    found = sorted(glob.glob(pattern))
    if found:
      return found[0]
  return None


def glibc_supports_hugetlb() -> bool:
  """``glibc.malloc.hugetlb`` exists from glibc 2.35."""
  name, version = platform.libc_ver()
  if name != "glibc" or not version:
    return False
  major, minor = (int(x) for x in version.split(".")[:2])
  return (major, minor) >= (2, 35)


def available_allocators() -> list[str]:
  """The allocators ``allocator_env`` can select on this host."""
  out = ["default"]
  if jemalloc_path():
    out.append("jemalloc")
  if glibc_supports_hugetlb():
    out.append("hugetlb")
  return out


def allocator_env(name: str, base: Mapping[str, str]) -> dict[str, str]:
  """A copy of ``base`` that makes a child process use allocator ``name``.

  Args:
    name: "default" (glibc malloc as configured), "jemalloc" (``LD_PRELOAD``)
      or "hugetlb" (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``).
    base: the environment to start from; existing allocator settings are removed.

  Returns:
    The child's environment.

  Raises:
    ValueError: ``name`` is unknown or not available on this host.
  """
  if name not in ALLOCATORS:
    raise ValueError(f"--allocator: expected one of {ALLOCATORS}, got {name!r}")
  env = dict(base)
  preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "jemalloc" not in p]
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
              if t and not t.startswith("glibc.malloc.hugetlb")]
  if name == "jemalloc":
    path = jemalloc_path()
    if path is None:
      raise ValueError("--allocator=jemalloc: no libjemalloc.so found (Debian/Ubuntu: "
                       "apt-get install -y libjemalloc2)")
    preload.append(path)
    # Without this, jemalloc (5.x) serves allocations over 8 MiB from an arena that returns
    # freed pages to the kernel at once: XLA's step then faults ~1.3 GB of fresh pages on
    # every call, as glibc does (measured here: 323k -> 117k minor faults per step).
    env.setdefault("MALLOC_CONF", "oversize_threshold:0")
  elif name == "hugetlb":
    if not glibc_supports_hugetlb():
      raise ValueError(f"--allocator=hugetlb: needs glibc >= 2.35, found "
                       f"{platform.libc_ver()}")
    tunables.append("glibc.malloc.hugetlb=1")
  for key, values in (("LD_PRELOAD", preload), ("GLIBC_TUNABLES", tunables)):
    if values:
      env[key] = ":".join(values)
    else:
      env.pop(key, None)
  return env


def active_allocator() -> str:
  """The allocator of this process: jemalloc if it is mapped, hugetlb if tuned, else default."""
  try:
    with open("/proc/self/maps") as f:
      if "jemalloc" in f.read():
        return "jemalloc"
  except OSError:
    pass
  if "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", ""):
    return "hugetlb"
  return "default"


def load_average() -> list[float] | None:
  """The 1, 5 and 15 minute load averages (other work on the host skews every figure)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def machine_info() -> dict[str, Any]:
  """Host facts that need no accelerator library."""
  return {
      "hostname": socket.gethostname(),
      "platform": platform.platform(),
      "cpu_model": cpu_model(),
      "cpu_flags": cpu_flags(),
      "cores": os.cpu_count(),
      "usable_cores": usable_cores(),
      "memory_bytes": memory_bytes(),
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "load_average": load_average(),
      "allocators_available": available_allocators(),
  }


def accelerator_info() -> dict[str, Any]:
  """JAX's backend and devices (imports jax), and torch's CUDA device if any."""
  import jax
  devices = jax.devices()
  out: dict[str, Any] = {
      "jax_backend": jax.default_backend(),
      "jax_devices": len(devices),
      "jax_device_kind": devices[0].device_kind,
      "jax_local_devices": jax.local_device_count(),
  }
  stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
  if stats and "bytes_limit" in stats:
    out["device_memory_bytes"] = int(stats["bytes_limit"])
  try:
    import torch
    if torch.cuda.is_available():
      out["torch_device"] = torch.cuda.get_device_name(0)
  except ImportError:
    pass
  return out


def report_header(benchmark: str, argv: Sequence[str], machine: Mapping[str, Any]
                  ) -> dict[str, Any]:
  """The fields a benchmark's report starts with: its name, the command that made it
  (``python -m benchmarks.<benchmark> argv...``), when it started (``machine``'s date: take
  ``machine_info()`` before the runs), the machine, the accelerator and the versions."""
  return {"benchmark": benchmark,
          "command": " ".join([f"python -m benchmarks.{benchmark}", *argv]),
          "started": machine["date"], "machine": machine, "accelerator": accelerator_info(),
          "versions": versions()}


def machine_slug(machine: Mapping[str, Any], accelerator: Mapping[str, Any]) -> str:
  """A file-name-safe name for the machine: ``cpu-amd-epyc-2c``, ``gpu-nvidia-h100-x8``."""
  def slug(text):
    text = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*$|\d+-core", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40] or "unknown"

  backend = accelerator.get("jax_backend", "cpu")
  if backend == "cpu":
    return f"cpu-{slug(machine['cpu_model'])}-{machine['cores']}c"
  return (f"{backend}-{slug(str(accelerator.get('jax_device_kind', '')))}"
          f"-x{accelerator.get('jax_devices', 1)}")
