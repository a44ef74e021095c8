"""JAX's persistent compilation cache for the command-line jobs (``main``, ``sweep``).

A rerun after a preemption, and any later run of the same programs, loads the
compiled train step, evaluation and initialiser from disk instead of compiling
them again: seconds on a CPU, minutes for a large model on a pod. Entries are
XLA executables keyed by the program, its devices, the XLA flags and the
jax/jaxlib versions, so a run computes the same bits with the cache or without
it.

Where it goes, first match wins:
  1. ``--compilation_cache_dir=DIR`` (``''``: off);
  2. JAX's own ``JAX_COMPILATION_CACHE_DIR``;
  3. ``DEFAULT_DIR``.
``JAX_ENABLE_COMPILATION_CACHE=false`` turns it off whatever the directory. JAX's
other settings (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``, one second by
default; ``JAX_COMPILATION_CACHE_MAX_SIZE``, unbounded by default) apply as usual.

On several CPU processes (gloo) the cache is off unless the flag names a
directory. JAX writes entries from process 0 only, and a CPU program's key
holds the topology fingerprint of its devices, which differs between processes
(jax 0.10.2: every program of a two-process run, the global train step
included). So process 0 would load the programs its peers compile: no process
gains, and process 0 reaches the first collective ahead of peers still
compiling, where gloo waits only 30 s. On GPU (JAX strips the device
assignment from the key) and TPU collectives wait longer; a pod's hosts may
share a ``gs://`` directory.
"""

from __future__ import annotations

import os

DEFAULT_DIR = "~/.cache/dsf3n_jax/jax"
ENV = "JAX_COMPILATION_CACHE_DIR"


def choose(flag: str | None, *, env: str | None, enabled: bool, cpu_processes: int) -> str | None:
  """The directory the cache uses, or None for none (the rules in the module docstring).

  Args:
    flag: ``--compilation_cache_dir``'s value; None when not given.
    env: ``JAX_COMPILATION_CACHE_DIR``'s value, if set.
    enabled: JAX's ``jax_enable_compilation_cache``.
    cpu_processes: the number of processes of a CPU job; 1 for GPU/TPU jobs.
  """
  if not enabled or flag == "":
    return None
  if flag:
    return flag
  if cpu_processes > 1:
    return None
  return env or os.path.expanduser(DEFAULT_DIR)


def setup(flag: str | None) -> str | None:
  """Turns JAX's persistent compilation cache on as ``choose`` says; returns its directory.

  Call it before anything compiles, after ``distributed.initialize``. A local
  directory that cannot be created is a ``ValueError`` naming the flag.
  """
  import jax  # pylint: disable=g-import-not-at-top

  env = os.environ.get(ENV) or None
  cpu_processes = jax.process_count() if jax.default_backend() == "cpu" else 1
  path = choose(flag, env=env, enabled=bool(jax.config.jax_enable_compilation_cache),
                cpu_processes=cpu_processes)
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      source = ("--compilation_cache_dir" if flag else ENV if env else
                "the default compilation cache")
      raise ValueError(f"{source}={path}: expected a directory it can create, got "
                       f"{type(e).__name__}: {e.strerror or e} ('' turns the cache off)") from e
  jax.config.update("jax_compilation_cache_dir", path)
  return path
