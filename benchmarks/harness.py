"""The benchmarks' harness: timing with warm-up and repeats, resources, the JAX setup.

Every timed figure is ``stats(values)``: median, min and max over repeated runs
after warm-up, and how many runs there were. Same model, same weights, same batch
everywhere: the JAX state is initialised once with seed 0 and batches are synthetic
features of VEGAS's shapes from a fixed numpy seed.
"""

from __future__ import annotations

import pathlib
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
VISUAL_DIM = 1024
AUDIO_DIM = 128


# ----------------------------------------------------------------------------
# Timing and resources.


def stats(values) -> dict[str, Any]:
  """Median, min, max and count of a list of numbers (None when it is empty)."""
  values = [float(v) for v in values]
  if not values:
    return {"median": None, "min": None, "max": None, "n": 0, "values": []}
  return {"median": statistics.median(values), "min": min(values), "max": max(values),
          "n": len(values), "values": values}


def repeat(fn: Callable[[], Any], *, warmup: int, repeats: int,
           budget_s: float = float("inf")) -> list[float]:
  """Seconds per call of ``fn`` over up to ``repeats`` calls after ``warmup`` calls.

  Stops early (after at least one timed call) once the timed calls took
  ``budget_s`` seconds, so slow baselines get fewer runs, never none.

  Args:
    fn: the work; must block until it is done.
    warmup: untimed calls first.
    repeats: the most timed calls.
    budget_s: time budget of the timed calls.

  Returns:
    The duration of each timed call.
  """
  for _ in range(warmup):
    fn()
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < repeats:
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
    if time.perf_counter() - start > budget_s:
      break
  return times


def rates(work: float, times) -> dict[str, Any]:
  """``stats`` of ``work / t`` (for example samples per second)."""
  return stats([work / t for t in times])


def host_peak_bytes() -> int:
  """Peak resident memory of this process so far (Linux ``ru_maxrss`` is in KiB)."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def minor_faults() -> int:
  """Minor page faults of this process so far (fresh pages the allocator touched)."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def device_peak_bytes(devices) -> int | None:
  peaks = []
  for d in devices:
    stats_ = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats_ and "peak_bytes_in_use" in stats_:
      peaks.append(int(stats_["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def flops_of(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def synthetic_batch(batch_size: int, *, seed: int = 0, visual_dim: int = VISUAL_DIM,
                    audio_dim: int = AUDIO_DIM,
                    num_classes: int = NUM_CLASSES) -> dict[str, np.ndarray]:
  """Features of VEGAS's shapes: visual (B, 1024) and audio (B, 128) float32, int32 labels."""
  rng = np.random.default_rng(seed)
  return {"visual": rng.random((batch_size, visual_dim), np.float32),
          "audio": rng.random((batch_size, audio_dim), np.float32),
          "label": rng.integers(0, num_classes, batch_size).astype(np.int32)}


# ----------------------------------------------------------------------------
# JAX setup.


def import_config():
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  from configs import default
  return default


_STATES: dict[str, Any] = {}


def jax_setup(params: Mapping[str, Any], *, batch_size: int, dtype: str = "float32",
              steps_per_epoch: int = 171):
  """Config, model kwargs, model, optimiser and the host copy of the initial state."""
  import jax

  from dsf3n_jax import train
  cfg = import_config().get_config(params.get("variants"))  # e.g. "unimodal": that recipe
  cfg.batch_size = batch_size
  cfg.model.dtype = dtype
  for key, value in (params.get("model") or {}).items():
    cfg.model[key] = value
  mcfg = train.model_config(cfg, num_classes=NUM_CLASSES, visual_dim=VISUAL_DIM,
                            audio_dim=AUDIO_DIM)
  model = train.build_model(mcfg)
  tx = train.build_optimizer(cfg, steps_per_epoch)
  key = repr(sorted(mcfg.items()))
  if key not in _STATES:  # one jitted init per model (op-by-op init compiles every op)
    _STATES[key] = jax.device_get(train.make_init_fn(model, tx, num_classes=NUM_CLASSES)(0))
  return cfg, mcfg, model, tx, _STATES[key]


def mesh_of(which: str):
  import jax

  from dsf3n_jax.mesh import make_mesh
  devices = jax.devices() if which == "all" else jax.devices()[:1]
  return make_mesh(devices), devices


