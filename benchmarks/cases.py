"""The measurements: each case takes a dict of parameters and returns a dict of figures.

``benchmarks.run`` runs every case in a fresh subprocess (so peak memory,
threads, allocator and device count are those of that case alone), or all in
one process for ``--smoke``. Every timed figure is ``stats(values)``: median,
min and max over repeated runs after warm-up, and how many runs there were.

Same model, same weights, same batch everywhere: the JAX state is initialised
once with seed 0 (``dsf3n_jax.train.init_state``) and written as the
original's state dict for PyTorch (``dsf3n_jax.convert.to_torch_state_dict``);
batches are synthetic features of VEGAS's shapes from a fixed numpy seed.
"""

from __future__ import annotations

import functools
import inspect
import pathlib
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from benchmarks import original_map, sysinfo

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


def _jax_device_peak(devices) -> int | None:
  peaks = []
  for d in devices:
    stats_ = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats_ and "peak_bytes_in_use" in stats_:
      peaks.append(int(stats_["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def _flops(compiled) -> float | None:
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


def _import_config():
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
  cfg = _import_config().get_config()
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
    init = jax.jit(lambda: train.init_state(model, tx, seed=0, num_classes=NUM_CLASSES))
    _STATES[key] = jax.device_get(init())
  return cfg, mcfg, model, tx, _STATES[key]


def _mesh(which: str):
  import jax
  devices = jax.devices() if which == "all" else jax.devices()[:1]
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  return mesh, devices


# ----------------------------------------------------------------------------
# Cases.


def case_info(params: Mapping[str, Any]) -> dict[str, Any]:
  """Machine, accelerator, versions, threads and allocator as a child process sees them."""
  import torch  # noqa: F401  (so thread_settings reports torch's threads)
  return {"machine": sysinfo.machine_info(), "accelerator": sysinfo.accelerator_info(),
          "versions": sysinfo.versions(), "threads": sysinfo.thread_settings(),
          "allocator": sysinfo.active_allocator()}


def case_matmul_peak(params: Mapping[str, Any]) -> dict[str, Any]:
  """Matrix-multiply throughput of the JAX device, the ceiling the model is compared with.

  Square products (n x n x n) and the model's bilinear product ((3 B) x 65,536
  x 256) in float32, and both with bfloat16 operands and float32 accumulation.
  """
  import jax
  import jax.numpy as jnp

  n = int(params["n"])
  rows, inner, cols = params["bilinear_shape"]
  out: dict[str, Any] = {"device": jax.devices()[0].device_kind,
                         "precision": str(jax.config.jax_default_matmul_precision)}
  key = jax.random.key(0)
  forms = {"square": (n, n, n), "bilinear": (rows, inner, cols)}
  for name, (m_, k_, n_) in forms.items():
    for dtype in ("float32", "bfloat16"):
      a = jax.random.normal(key, (m_, k_), jnp.float32).astype(dtype)
      b = jax.random.normal(jax.random.fold_in(key, 1), (k_, n_), jnp.float32).astype(dtype)
      f = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
      f(a, b).block_until_ready()
      times = repeat(lambda f=f, a=a, b=b: f(a, b).block_until_ready(),
                     warmup=params["warmup"], repeats=params["repeats"])
      out[f"{name}_{dtype}"] = {"shape": [m_, k_, n_],
                                "gflops": rates(2.0 * m_ * k_ * n_ / 1e9, times)}
  out["peak_float32_gflops"] = max(out[f"{f}_float32"]["gflops"]["median"] for f in forms)
  out["peak_bfloat16_gflops"] = max(out[f"{f}_bfloat16"]["gflops"]["median"] for f in forms)
  return out


def case_weights(params: Mapping[str, Any]) -> dict[str, Any]:
  """Writes the initial JAX weights as the original's state dict, plus centres, to an npz."""
  from dsf3n_jax import convert
  _, mcfg, _, _, state = jax_setup(params, batch_size=128)
  state_dict = convert.to_torch_state_dict({"params": state.params,
                                            "batch_stats": state.batch_stats})
  np.savez(params["path"], **{f"model/{k}": v for k, v in state_dict.items()},
           centers=np.asarray(state.centers))
  num_params = int(sum(np.asarray(x).size for x in __import__("jax").tree.leaves(state.params)))
  return {"path": params["path"], "num_params": num_params, "model": mcfg}


def case_jax_train(params: Mapping[str, Any]) -> dict[str, Any]:
  """One training step (forward, loss, backward, both optimiser updates), jitted.

  ``params["devices"]``: "one" (the first device) or "all" (data-parallel over
  every local device, the batch split on the ``data`` axis).
  """
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from dsf3n_jax import train
  batch_size, dtype = int(params["batch_size"]), params.get("dtype", "float32")
  cfg, _, model, tx, state = jax_setup(params, batch_size=batch_size, dtype=dtype)
  mesh, devices = _mesh(params.get("devices", "one"))
  if batch_size % len(devices):
    raise ValueError(f"batch_size={batch_size} is not divisible by {len(devices)} devices")
  step = train.make_train_step(train.per_device_step(cfg, model, tx), mesh)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  batch = jax.device_put(synthetic_batch(batch_size), NamedSharding(mesh, P("data")))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  flops = _flops(compiled)
  holder = {"state": state}
  steps = int(params["steps_per_repeat"])

  def run():
    for _ in range(steps):
      holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready((holder["state"], metrics))

  run()  # first execution (allocations), not timed
  for _ in range(max(params["warmup"] - 1, 0)):
    run()
  faults0 = minor_faults()
  times = repeat(run, warmup=0, repeats=params["repeats"],
                 budget_s=params.get("budget_s", float("inf")))
  faults = (minor_faults() - faults0) / (len(times) * steps)
  loss = float(jax.device_get(compiled(holder["state"], batch)[1]["loss"]))
  return {"batch_size": batch_size, "dtype": dtype, "devices": len(devices),
          "device_kind": devices[0].device_kind, "compile_s": compile_s,
          "samples_per_s": rates(batch_size * steps, times),
          "flops_per_step": flops,
          "flops_per_sample": flops * len(devices) / batch_size if flops else None,
          "minor_faults_per_step": faults, "page_bytes_per_step": faults * resource.getpagesize(),
          "host_peak_bytes": host_peak_bytes(), "device_peak_bytes": _jax_device_peak(devices),
          "loss_finite": bool(np.isfinite(loss)), "allocator": sysinfo.active_allocator()}


def case_jax_epoch(params: Mapping[str, Any]) -> dict[str, Any]:
  """One whole epoch as one compiled call (``lax.scan`` over the steps, data on device)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from dsf3n_jax import train
  batch_size, num_examples = int(params["batch_size"]), int(params["num_examples"])
  steps = num_examples // batch_size
  cfg, _, model, tx, state = jax_setup(params, batch_size=batch_size,
                                       steps_per_epoch=steps)
  mesh, devices = _mesh(params.get("devices", "one"))
  data = synthetic_batch(num_examples, seed=1)
  t0 = time.perf_counter()
  arrays = jax.block_until_ready(jax.device_put(data, NamedSharding(mesh, P())))
  put_s = time.perf_counter() - t0
  state = jax.device_put(state, NamedSharding(mesh, P()))
  epoch = train.make_train_epoch(train.per_device_step(cfg, model, tx), mesh,
                                 global_batch_size=batch_size, num_examples=num_examples,
                                 seed=0, shuffle=True)
  t0 = time.perf_counter()
  compiled = epoch.lower(state, arrays, jnp.int32(0)).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state, "epoch": 0}

  def run():
    holder["state"], metrics = compiled(holder["state"], arrays, jnp.int32(holder["epoch"]))
    holder["epoch"] += 1
    jax.block_until_ready((holder["state"], metrics))

  times = repeat(run, warmup=params.get("warmup", 0), repeats=params["repeats"],
                 budget_s=params.get("budget_s", float("inf")))
  return {"batch_size": batch_size, "num_examples": num_examples, "steps": steps,
          "devices": len(devices), "compile_s": compile_s, "device_put_s": put_s,
          "epoch_s": stats(times), "samples_per_s": rates(steps * batch_size, times),
          "host_peak_bytes": host_peak_bytes(), "device_peak_bytes": _jax_device_peak(devices)}


def _call_blocking(fn, *args):
  import jax
  return jax.block_until_ready(fn(*args))


def _torch_model(params, *, einsum: bool, device):
  import torch

  from benchmarks import torch_dsf3n
  kwargs = {k: v for k, v in (params.get("model") or {}).items()}
  for key in ("kernel_sizes", "branch_features"):
    if key in kwargs:
      kwargs[key] = tuple(kwargs[key])
  model = torch_dsf3n.CrossModalNN(NUM_CLASSES, einsum_bilinear=einsum, **kwargs)
  saved = np.load(params["weights"])
  state_dict = {k[len("model/"):]: torch.from_numpy(saved[k]) for k in saved.files
                if k.startswith("model/")}
  missing, unexpected = model.load_state_dict(state_dict, strict=False)
  missing = [k for k in missing if not k.endswith("num_batches_tracked")]
  if missing or unexpected:
    raise ValueError(f"{params['weights']}: state dict does not fit CrossModalNN: missing "
                     f"{missing[:5]}, unexpected {unexpected[:5]}")
  centers = torch_dsf3n.CenterLoss(NUM_CLASSES, saved["centers"].shape[1])
  with torch.no_grad():
    centers.center.copy_(torch.from_numpy(saved["centers"]))
  return model.to(device), centers.to(device)


def _torch_sync(device):
  import torch
  if device.type == "cuda":
    torch.cuda.synchronize()


def case_torch_train(params: Mapping[str, Any]) -> dict[str, Any]:
  """The PyTorch baseline's training step: Adam on the net, SGD on the centres, eager or compiled.

  ``params["einsum"]``: False is ``nn.Bilinear`` (the original's code path),
  True the einsum bilinear. ``params["compile"]``: wrap the model in
  ``torch.compile`` (the optimiser steps stay eager).
  """
  import torch

  from benchmarks import torch_dsf3n
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  batch_size = int(params["batch_size"])
  model, centers = _torch_model(params, einsum=bool(params["einsum"]), device=device)
  model.train()
  forward = torch.compile(model) if params.get("compile") else model
  net_opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.999), eps=1e-8)
  center_opt = torch.optim.SGD(centers.parameters(), lr=0.05)
  batch = {k: torch.from_numpy(v).to(device) for k, v in synthetic_batch(batch_size).items()}
  steps = int(params["steps_per_repeat"])
  losses = []

  def run():
    for _ in range(steps):
      net_opt.zero_grad(set_to_none=True)
      center_opt.zero_grad(set_to_none=True)
      outputs = forward(batch["visual"], batch["audio"])
      loss, _ = torch_dsf3n.total_loss(outputs, batch["label"], centers, alpha=1e-4, beta=5e-4)
      loss.backward()
      net_opt.step()
      center_opt.step()
    _torch_sync(device)
    losses.append(float(loss.detach()))

  t0 = time.perf_counter()
  run()  # first call: torch.compile compiles here
  first_s = time.perf_counter() - t0
  for _ in range(max(params["warmup"] - 1, 0)):
    run()
  faults0 = minor_faults()
  times = repeat(run, warmup=0, repeats=params["repeats"],
                 budget_s=params.get("budget_s", float("inf")))
  calls = len(times)
  out = {"batch_size": batch_size, "einsum": bool(params["einsum"]),
         "compile": bool(params.get("compile")), "device": str(device),
         "first_call_s": first_s, "samples_per_s": rates(batch_size * steps, times),
         "minor_faults_per_step": (minor_faults() - faults0) / (calls * steps),
         "host_peak_bytes": host_peak_bytes(),
         "device_peak_bytes": (int(torch.cuda.max_memory_allocated())
                               if device.type == "cuda" else None),
         "loss_finite": bool(np.isfinite(losses[-1])), "threads": torch.get_num_threads(),
         "allocator": sysinfo.active_allocator()}
  return out


def case_embed(params: Mapping[str, Any]) -> dict[str, Any]:
  """Eval-mode forward (the four outputs) of one batch: JAX float32 and bf16, PyTorch eager."""
  import jax
  import torch
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from dsf3n_jax import train
  batch_size = int(params["batch_size"])
  batch = synthetic_batch(batch_size)
  out: dict[str, Any] = {"batch_size": batch_size}
  for dtype in ("float32", "bfloat16"):
    _, mcfg, _, _, state = jax_setup(params, batch_size=batch_size, dtype=dtype)
    mesh, _ = _mesh("one")
    if "mesh" in inspect.signature(train.make_embed_fn).parameters:
      embed = train.make_embed_fn(train.build_model(mcfg), mesh)
    else:
      embed = train.make_embed_fn(train.build_model(mcfg, axis_name=None))
    variables = jax.device_put({"params": state.params, "batch_stats": state.batch_stats},
                               NamedSharding(mesh, P()))
    visual, audio = (jax.device_put(batch[k], NamedSharding(mesh, P("data")))
                     for k in ("visual", "audio"))
    t0 = time.perf_counter()
    jax.block_until_ready(embed(variables, visual, audio))
    first = time.perf_counter() - t0
    times = repeat(functools.partial(_call_blocking, embed, variables, visual, audio),
                   warmup=params["warmup"], repeats=params["repeats"])
    out[f"jax_{dtype}"] = {"samples_per_s": rates(batch_size, times), "first_call_s": first}
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  tb = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
  for einsum in (False, True):
    model, _ = _torch_model(params, einsum=einsum, device=device)
    model.eval()

    def run(model=model):
      with torch.no_grad():
        model(tb["visual"], tb["audio"])
      _torch_sync(device)

    times = repeat(run, warmup=params["warmup"], repeats=params["repeats"],
                   budget_s=params.get("budget_s", float("inf")))
    out["torch_einsum" if einsum else "torch_bilinear"] = {
        "samples_per_s": rates(batch_size, times)}
  out["host_peak_bytes"] = host_peak_bytes()
  return out


def case_map_compare(params: Mapping[str, Any]) -> dict[str, Any]:
  """mAP (audio -> visual, all items ranked) by four implementations on the same embeddings.

  The original loop runs at ``params["original_n"]`` (the others at ``n``
  too when it differs, so each speed-up compares equal sizes).
  """
  from dsf3n_jax import metrics

  out: dict[str, Any] = {}
  sizes = sorted({int(params["n"]), int(params["original_n"])})
  for n in sizes:
    visual, audio, labels = original_map.synthetic_embeddings(n)
    row: dict[str, Any] = {"n": n}
    impls = {
        "ours": functools.partial(metrics.mean_average_precision, audio, visual, labels,
                                  labels, distance="cosine"),
        "numpy": functools.partial(original_map.numpy_map, audio, visual, labels, labels),
        "sklearn": functools.partial(original_map.sklearn_map, audio, visual, labels, labels),
    }
    if n == int(params["original_n"]):
      impls["original"] = functools.partial(original_map.fx_calc_map_label, audio, visual,
                                            labels)
    for name, fn in impls.items():
      value = {}
      t0 = time.perf_counter()
      value["map"] = fn()
      first = time.perf_counter() - t0
      if name == "original":
        warmup, repeats = 0, int(params["original_repeats"]) - 1
        times = [first] + repeat(fn, warmup=0, repeats=repeats) if repeats else [first]
      else:
        warmup, repeats = 0, int(params["repeats"])
        times = repeat(fn, warmup=warmup, repeats=repeats, budget_s=params.get("budget_s", 60))
      row[name] = {"seconds": stats(times), "first_call_s": first, "map": value["map"]}
    maps = [row[k]["map"] for k in impls]
    row["max_abs_difference"] = float(max(maps) - min(maps))
    out[str(n)] = row
  out["host_peak_bytes"] = host_peak_bytes()
  return out


def case_map_scaling(params: Mapping[str, Any]) -> dict[str, Any]:
  """Our mAP kernel on ``queries`` x ``items``; the time for all ``items`` queries is extrapolated.

  Query blocks are independent, so the time is linear in the number of
  queries; the figure for a square problem is ``seconds * items / queries``.
  """
  from dsf3n_jax import metrics

  items_n, queries_n, k = int(params["items"]), int(params["queries"]), int(params["k"])
  visual, audio, labels = original_map.synthetic_embeddings(items_n)
  q, ql = audio[:queries_n], labels[:queries_n]
  fn = lambda: metrics.mean_average_precision(q, visual, ql, labels, distance="cosine",
                                              k=k or None)
  t0 = time.perf_counter()
  value = fn()
  first = time.perf_counter() - t0
  times = repeat(fn, warmup=0, repeats=params["repeats"], budget_s=params.get("budget_s", 60))
  return {"items": items_n, "queries": queries_n, "k": k, "map": value, "first_call_s": first,
          "seconds": stats(times),
          "square_seconds_extrapolated": statistics.median(times) * items_n / queries_n,
          "host_peak_bytes": host_peak_bytes()}


CASES: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "info": case_info,
    "matmul_peak": case_matmul_peak,
    "weights": case_weights,
    "jax_train": case_jax_train,
    "jax_epoch": case_jax_epoch,
    "torch_train": case_torch_train,
    "embed": case_embed,
    "map_compare": case_map_compare,
    "map_scaling": case_map_scaling,
}
