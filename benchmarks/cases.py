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
import re
import resource
import statistics
import sys
import time
from collections import Counter
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

  from dsf3n_jax.mesh import make_mesh
  devices = jax.devices() if which == "all" else jax.devices()[:1]
  return make_mesh(devices), devices


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


def _compiled_step(params: Mapping[str, Any], *, devices: str):
  """The jitted training step of ``params`` compiled for one synthetic batch.

  Returns:
    ``(compiled, state, batch, compile_s, devices)``, state and batch placed on the mesh.
  """
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from dsf3n_jax import train
  batch_size, dtype = int(params["batch_size"]), params.get("dtype", "float32")
  cfg, _, model, tx, state = jax_setup(params, batch_size=batch_size, dtype=dtype)
  mesh, devs = _mesh(devices)
  if batch_size % len(devs):
    raise ValueError(f"batch_size={batch_size} is not divisible by {len(devs)} devices")
  step = train.make_train_step(train.per_device_step(cfg, model, tx), mesh)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  batch = jax.device_put(synthetic_batch(batch_size), NamedSharding(mesh, P("data")))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  return compiled, state, batch, time.perf_counter() - t0, devs


def case_jax_train(params: Mapping[str, Any]) -> dict[str, Any]:
  """One training step (forward, loss, backward, both optimiser updates), jitted.

  ``params["devices"]``: "one" (the first device) or "all" (data-parallel over
  every local device, the batch split on the ``data`` axis).
  """
  import jax

  batch_size, dtype = int(params["batch_size"]), params.get("dtype", "float32")
  compiled, state, batch, compile_s, devices = _compiled_step(
      params, devices=params.get("devices", "one"))
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


def _recipe_evaluations(num_epochs: int, eval_every: int) -> int:
  """How many evaluations ``train_and_evaluate`` runs: every ``eval_every`` epochs and the last."""
  return sum(1 for e in range(1, num_epochs + 1)
             if e == num_epochs or (eval_every and e % eval_every == 0))


def _time_evaluation(cfg, model, state, mesh, params: Mapping[str, Any]) -> dict[str, Any]:
  """``train.evaluate`` (embed, loss, both mAPs) on a VEGAS-sized synthetic test split."""
  from dsf3n_jax import input_pipeline, train
  n = int(params["eval_examples"])
  test = synthetic_batch(n, seed=2)
  source = input_pipeline.ArraySource(test["visual"], test["audio"], test["label"])
  cfg.eval_batch_size = int(params.get("eval_batch_size", cfg.eval_batch_size))
  embed_fn = train.make_embed_fn(model, mesh)
  out: dict[str, Any] = {"examples": n, "batch_size": cfg.eval_batch_size}
  try:
    t0 = time.perf_counter()
    train.evaluate(embed_fn, state, source, config=cfg, mesh=mesh)
    out["first_call_s"] = time.perf_counter() - t0  # compiles the embedding and the mAP
    t0 = time.perf_counter()
    result = train.evaluate(embed_fn, state, source, config=cfg, mesh=mesh)
    out["evaluate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train.embed_split(embed_fn, state.variables, source, mesh=mesh,
                      batch_size=cfg.eval_batch_size)
    out["embed_s"] = time.perf_counter() - t0
    out["map_average"] = result["map_average"]
  except Exception as e:  # the epoch figures stand without it
    out["error"] = f"{type(e).__name__}: {e}"
  return out


def compiled_scan_epoch(step_fn, cfg, state, source, mesh, *, batch_size: int,
                        num_examples: int):
  """``train.make_train_epoch`` (``lax.scan`` over the steps) with ``source`` on the device.

  Returns:
    ``(compiled, arrays, device_put_s, compile_s)``: the compiled epoch, called
    as ``compiled(state, arrays, epoch)``, and the seconds each part took.
  """
  import jax
  import jax.numpy as jnp

  from dsf3n_jax import input_pipeline, train
  t0 = time.perf_counter()
  arrays = jax.block_until_ready(
      input_pipeline.to_device(input_pipeline.load_split_arrays(source), mesh))
  put_s = time.perf_counter() - t0
  epoch_fn = train.make_train_epoch(step_fn, mesh, global_batch_size=batch_size,
                                    num_examples=num_examples, seed=cfg.seed,
                                    shuffle=cfg.data.shuffle)
  t0 = time.perf_counter()
  compiled = epoch_fn.lower(state, arrays, jnp.int32(0)).compile()
  return compiled, arrays, put_s, time.perf_counter() - t0


def case_jax_epoch(params: Mapping[str, Any]) -> dict[str, Any]:
  """One epoch as ``train.train_and_evaluate`` runs it, and the recipe extrapolated from it.

  ``params["on_device"]`` ("auto", "true" or "false"; default "auto") is
  resolved like ``config.data.on_device`` (``train.resolve_on_device``):

  * on device ("scan"): the split is copied to the device once and the epoch
    is one compiled call, ``train.make_train_epoch`` (``lax.scan`` over the
    steps, the permutation drawn on device);
  * streamed ("streaming", "auto" on CPU): an ``input_pipeline.TrainLoader``
    over an in-memory ``ArraySource`` feeds the jitted step
    (``train.make_train_step``) batch by batch, metrics fetched every
    ``log_every_steps`` steps and stacked on the host at the end of the epoch,
    as in training.

  Compilation (``lower().compile()``) is timed apart; each timed epoch
  (``repeats``, the first right after compilation) is a full pass of
  ``num_examples // batch_size`` steps. Streamed, ``loader_epoch_s`` is one
  more epoch of batches from the loader alone (the input pipeline's cost).
  With ``eval_examples`` > 0 it also times ``train.evaluate`` (embedding with
  ``train.make_embed_fn``, the loss and both mAPs) on a synthetic test split of
  that size: the first call (with its compiles), then once warm. The recipe
  (``num_epochs`` and ``eval_every_epochs`` of the default config) is
  extrapolated as compile + epochs x the median epoch + the first evaluation
  + the other evaluations x the warm one; the epoch is scaled linearly to
  ``recipe_examples`` when the measured one is smaller.
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from dsf3n_jax import input_pipeline, train
  batch_size, num_examples = int(params["batch_size"]), int(params["num_examples"])
  steps = num_examples // batch_size
  cfg, _, model, tx, host_state = jax_setup(params, batch_size=batch_size,
                                            steps_per_epoch=steps)
  on_device = train.resolve_on_device(params.get("on_device", "auto"))
  mesh, devices = _mesh(params.get("devices", "one"))
  data = synthetic_batch(num_examples, seed=1)
  state = jax.device_put(host_state, NamedSharding(mesh, P()))
  step_fn = train.per_device_step(cfg, model, tx)
  holder: dict[str, Any] = {"state": state, "epoch": 0}
  out: dict[str, Any] = {"mode": "scan" if on_device else "streaming",
                         "on_device_param": str(params.get("on_device", "auto")),
                         "backend": jax.default_backend(), "batch_size": batch_size,
                         "num_examples": num_examples, "steps": steps, "devices": len(devices)}
  source = input_pipeline.ArraySource(data["visual"], data["audio"], data["label"])
  if on_device:
    compiled, arrays, out["device_put_s"], out["compile_s"] = compiled_scan_epoch(
        step_fn, cfg, state, source, mesh, batch_size=batch_size, num_examples=num_examples)

    def run():
      holder["state"], metrics = compiled(holder["state"], arrays,
                                          jnp.asarray(holder["epoch"], jnp.int32))
      jax.block_until_ready(holder["state"])
      holder["loss"] = np.asarray(metrics["loss"])
      holder["epoch"] += 1
  else:
    loader = input_pipeline.TrainLoader(source, global_batch_size=batch_size, mesh=mesh,
                                        seed=cfg.seed, shuffle=cfg.data.shuffle)
    batches = iter(loader)
    # A batch of the loader's structure (with "index") from a throwaway loader, to lower with.
    probe = input_pipeline.TrainLoader(source, global_batch_size=batch_size, mesh=mesh,
                                       prefetch=False)
    example = next(probe)
    probe.close()
    t0 = time.perf_counter()
    compiled = train.make_train_step(step_fn, mesh).lower(state, example).compile()
    out["compile_s"] = time.perf_counter() - t0
    log_every = int(cfg.log_every_steps)

    def run():
      collected = []
      for i in range(steps):
        holder["state"], m = compiled(holder["state"], next(batches))
        collected.append(m)
        if log_every and (i + 1) % log_every == 0:
          jax.device_get(m)  # training logs here (a host sync)
      metrics = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *collected)
      holder["loss"] = metrics["loss"]
      holder["epoch"] += 1

  times = repeat(run, warmup=int(params.get("warmup", 0)), repeats=int(params["repeats"]),
                 budget_s=params.get("budget_s", float("inf")))
  if not on_device:
    # The input pipeline alone: one more epoch of batches, no step.
    t0 = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(next(batches))
    out["loader_epoch_s"] = time.perf_counter() - t0
    loader.close()
  out.update(epoch_s=stats(times), samples_per_s=rates(steps * batch_size, times),
             loss_finite=bool(np.all(np.isfinite(holder["loss"]))),
             host_peak_bytes=host_peak_bytes(), device_peak_bytes=_jax_device_peak(devices))
  if int(params.get("eval_examples", 0)):
    out["evaluation"] = _time_evaluation(cfg, model, holder["state"], mesh, params)
  # The recipe: the default config's epochs and evaluations, at ``recipe_examples``.
  recipe_examples = int(params.get("recipe_examples", num_examples))
  recipe_steps = recipe_examples // batch_size
  epoch_s = statistics.median(times) * recipe_steps / steps
  evaluations = _recipe_evaluations(int(cfg.num_epochs), int(cfg.eval_every_epochs))
  evaluation = out.get("evaluation", {})
  train_s = out["compile_s"] + cfg.num_epochs * epoch_s
  total_s = None
  if "evaluate_s" in evaluation:
    total_s = train_s + evaluation["first_call_s"] + (evaluations - 1) * evaluation["evaluate_s"]
  out["recipe"] = {
      "epochs": int(cfg.num_epochs), "examples": recipe_examples, "steps_per_epoch": recipe_steps,
      "epoch_s": epoch_s, "scaled_from_steps": steps if recipe_steps != steps else None,
      "evaluations": evaluations, "evaluation_s": evaluation.get("evaluate_s"),
      "evaluation_examples": evaluation.get("examples"), "train_s": train_s, "total_s": total_s,
      "includes": ("compile of the step + epochs x one epoch (batches, step, metrics)"
                   + (" + evaluations x train.evaluate (embedding, loss, mAP both ways; the "
                      "first with its compile)" if total_s else "")
                   + "; not included: reading the data from disk, checkpoints"),
  }
  return out


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
  from dsf3n_jax.datasets import validation
  saved = validation.read_npz(params["weights"], expected=(
      "a weights .npz of arrays (model/<torch state-dict key> and centers)"))
  state_dict = {k[len("model/"):]: torch.from_numpy(v) for k, v in saved.items()
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
      embed = train.make_embed_fn(train.build_model(mcfg), mesh, unimodal=False)
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
  """mAP (audio -> visual, all items ranked) on the same embeddings: ours (the default and
  each strategy), the original loop, numpy and scikit-learn.

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
        # Both exact strategies, whichever the default is on this backend.
        **{f"ours_{s}": functools.partial(metrics.mean_average_precision, audio, visual, labels,
                                          labels, distance="cosine", strategy=s)
           for s in ("sort", "count")},
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


# ----------------------------------------------------------------------------
# Per-op profile of the compiled training step.

_HLO_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_HLO_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_HLO_DIMS = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
# Instructions that only move, view or build data.
_LAYOUT_OPS = {"parameter", "constant", "copy", "transpose", "bitcast", "reshape", "broadcast",
               "slice", "concatenate", "pad", "reverse", "tuple", "get-tuple-element", "iota",
               "bitcast-convert", "copy-start", "copy-done"}
_CONTROL_OPS = {"while", "conditional", "call"}
_COLLECTIVE_OPS = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                   "collective-permute", "all-reduce-start", "all-reduce-done"}
CATEGORIES = ("matmul: bilinear", "matmul: other", "convolution", "elementwise", "reduction",
              "copy/transpose", "gather/scatter", "sort", "collective", "other")


def parse_hlo(text: str) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
  """The instructions and computations of an HLO module's text (``compiled.as_text()``).

  Args:
    text: the module.

  Returns:
    ``(instructions, computations)``: ``{name: {"opcode", "dims" (None for
    tuples), "shape", "operands", "calls", "attrs", "op_name",
    "computation"}}`` and ``{computation: [instruction names]}``.
  """
  instrs: dict[str, dict[str, Any]] = {}
  computations: dict[str, list[str]] = {}
  current = None
  for line in text.splitlines():
    if not line.startswith(" "):
      m = _HLO_COMPUTATION.match(line)
      if m:
        current = m.group(1)
        computations[current] = []
      continue
    m = _HLO_INSTRUCTION.match(line)
    if not m or current is None:
      continue
    name, shape, opcode, rest = m.groups()
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        end = i
        break
    attrs = rest[end + 1:]
    dims = _HLO_DIMS.match(shape)
    op_name = re.search(r'op_name="([^"]*)"', attrs)
    instrs[name] = {
        "opcode": opcode, "shape": shape.split("{")[0] if dims else shape,
        "dims": [int(d) for d in dims.group(1).split(",") if d] if dims else None,
        "operands": re.findall(r"%([\w.\-]+)", rest[:end]),
        "calls": re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", attrs)
                 + re.findall(r"%([\w.\-]+)", "".join(re.findall(
                     r"branch_computations=\{([^}]*)\}", attrs))),
        "attrs": attrs, "op_name": op_name.group(1) if op_name else "", "computation": current}
    computations[current].append(name)
  return instrs, computations


def hlo_flops(name: str, instrs: Mapping[str, Any]) -> float:
  """FLOPs of one ``dot`` or ``convolution`` instruction (2 per multiply-add), else 0."""
  ins = instrs[name]
  if ins["dims"] is None:
    return 0.0
  out = float(np.prod(ins["dims"]))
  if ins["opcode"] == "dot":
    lhs = instrs.get(ins["operands"][0], {}).get("dims")
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins["attrs"])
    if lhs is None or contracting is None:
      return 0.0
    return 2.0 * out * float(np.prod([lhs[int(c)] for c in contracting.group(1).split(",")
                                      if c]))
  if ins["opcode"] == "convolution":
    rhs = instrs.get(ins["operands"][1], {}).get("dims")
    labels = re.search(r"dim_labels=\w+_(\w+)->", ins["attrs"])
    if rhs is None or labels is None or "o" not in labels.group(1):
      return 0.0
    return 2.0 * out * float(np.prod(rhs)) / rhs[labels.group(1).index("o")]
  return 0.0


def classify_hlo(name: str, instrs: Mapping[str, Any],
                 computations: Mapping[str, list[str]]) -> tuple[str, float]:
  """The category (one of ``CATEGORIES``, or "control flow") and FLOPs of one executed op.

  A fusion is classified by what it contains (through nested computations):
  a product before a convolution, before a sort, before a reduction.
  """
  ins = instrs[name]
  inner, seen, todo = [name], set(), list(ins["calls"])
  while todo:
    comp = todo.pop()
    if comp in seen or comp not in computations:
      continue
    seen.add(comp)
    for n in computations[comp]:
      inner.append(n)
      todo.extend(instrs[n]["calls"])
  opcodes = {instrs[n]["opcode"] for n in inner}
  flops = sum(hlo_flops(n, instrs) for n in inner)
  if ins["opcode"] in _CONTROL_OPS:
    return "control flow", flops
  if "dot" in opcodes:
    bilinear = any("/bilinear/" in instrs[n]["op_name"] for n in inner
                   if instrs[n]["opcode"] == "dot")
    return ("matmul: bilinear" if bilinear else "matmul: other"), flops
  if "convolution" in opcodes:
    return "convolution", flops
  if "sort" in opcodes:
    return "sort", flops
  if opcodes & _COLLECTIVE_OPS:
    return "collective", flops
  if opcodes & {"reduce", "reduce-window", "select-and-scatter"}:
    return "reduction", flops
  if opcodes & {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}:
    return "gather/scatter", flops
  if ins["opcode"] == "custom-call":
    return "other", flops
  if opcodes <= _LAYOUT_OPS:
    return "copy/transpose", flops
  return "elementwise", flops


# An op traced in the model's forward ("jvp") or backward ("transpose(jvp)") pass, also
# inside a loop body: "jit(f)/while/body/closed_call/transpose(jvp(M))/a/b/dot_general".
_MODEL_OP = re.compile(r"^jit\([^)]*\)/(?:[^()]*?/)?(transpose\(jvp\([^)]*\)\)|jvp\([^)]*\))/(.*)$")


def _short_op_name(op_name: str) -> str:
  """``jit(f)/transpose(jvp(M))/a/b`` -> ``bwd a/b``; ``jit(f)/jvp(M)/a/b`` -> ``fwd a/b``."""
  m = _MODEL_OP.match(op_name)
  if m:
    return ("bwd " if m.group(1).startswith("transpose") else "fwd ") + m.group(2)
  return re.sub(r"^jit\([^)]*\)/", "", op_name)


def _layer_of(op_name: str) -> str:
  """The model layer an op comes from: ``jit(f)/transpose(jvp(M))/a/b/dot_general`` -> ``a/b``."""
  m = _MODEL_OP.match(op_name)
  if not m:
    return "(outside the model: losses, optimisers)" if op_name else "(no source recorded)"
  parts = m.group(2).split("/")
  keep = []
  for part in parts:
    if not re.fullmatch(r"[\w.\-]+", part):
      break
    keep.append(part)
  if len(keep) == len(parts):
    keep = keep[:-1]  # the primitive
  return "/".join(keep) or "(model, top level)"


def trace_op_times(trace_dir: str, module: str) -> tuple[list[tuple], Counter]:
  """Where the time of every op of ``module`` went, from a ``jax.profiler.trace``.

  Reads the ``.xplane.pb`` with ``jax.profiler.ProfileData`` (no TensorFlow
  needed). On a GPU or TPU the ops are the device plane's events. On CPU,
  XLA runs each op as a thunk on a thread pool, and a thunk may hand work to
  the pool and return before it is done (Eigen products and convolutions), so
  its own event is not its cost: every pool task (a ``ThreadpoolListener``
  region) is charged to the op whose thunk scheduled it (the ``Record`` with
  the task's id, followed through tasks that schedule tasks). Time in the
  thunk executor outside any op, or in tasks of no op, is charged to ``None``;
  the calling thread's wait for the step is not counted.

  Args:
    trace_dir: the folder ``jax.profiler.trace`` wrote.
    module: the HLO module's name (``HloModule <name>``).

  Returns:
    ``(pieces, calls)``: ``(op or None, run_id, start_ns, end_ns, thread)``
    for each stretch of time one thread spent on one op, and the number of
    executions of each ``(run_id, op)``.
  """
  import glob

  import jax
  files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  if not files:
    raise FileNotFoundError(f"no .xplane.pb under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(files[-1])
  pieces: list[tuple] = []
  device: list[tuple] = []
  calls: Counter = Counter()
  owner: dict[Any, tuple | None] = {}  # pool task id -> what scheduled it
  tasks: list[tuple] = []  # (task id, start, end, thread): task time outside any thunk
  for plane in data.planes:
    on_device = plane.name.startswith("/device:")
    for line in plane.lines:
      thread = f"{plane.name}/{line.name}"
      items = []
      for i, event in enumerate(line.events):
        start, end = float(event.start_ns), float(event.start_ns + event.duration_ns)
        name = event.name
        if name.startswith("ThreadpoolListener::"):
          st = dict(event.stats)
          if name.endswith("StartRegion"):
            items.append((start, 1, "start", st.get("_c")))
          elif name.endswith("StopRegion"):
            items.append((start, 0, "stop", None))
          elif name.endswith("Record"):
            items.append((start, 2, "record", st.get("_p")))
          continue
        if name.startswith("ThunkExecutor::Execute"):
          # The caller blocked on the step ("wait for completion") is no work.
          ctx = ("wait" if "wait" in name else "runtime", None, i)
        else:
          st = dict(event.stats)
          if "hlo_op" not in st:
            continue
          if st.get("hlo_module", module) != module:
            ctx = ("foreign", None, i)
          else:
            key = (str(st["hlo_op"]), st.get("run_id"))
            calls[key[1], key[0]] += 1
            ctx = ("op", key, i)
            if on_device:
              device.append((key[0], key[1], start, end, thread))
              continue
        items += [(start, 1, "push", ctx), (end, 0, "pop", ctx)]
      items.sort(key=lambda x: (x[0], x[1]))
      stack: list[tuple] = []
      task, last = None, None
      for t, _, kind, value in items:
        if last is not None and t > last:
          if stack:
            top = stack[-1]
            if top[0] not in ("foreign", "wait"):
              op = top[1] if top[0] == "op" else (None, None)
              pieces.append((op[0], op[1], last, t, thread))
          elif task is not None:
            tasks.append((task, last, t, thread))
        last = t
        if kind == "push":
          stack.append(value)
        elif kind == "pop":
          if value in stack:
            del stack[len(stack) - 1 - stack[::-1].index(value)]
        elif kind == "start":
          task = value
        elif kind == "stop":
          task = None
        elif kind == "record":
          owner[value] = stack[-1] if stack else (("task", task, None) if task is not None
                                                   else None)
  if device:
    return device, calls
  for task, start, end, thread in tasks:
    who = owner.get(task)
    for _ in range(1000):  # tasks that schedule tasks
      if who is None or who[0] != "task":
        break
      who = owner.get(who[1])
    if who is not None and who[0] == "foreign":
      continue
    op = who[1] if who is not None and who[0] == "op" else (None, None)
    pieces.append((op[0], op[1], start, end, thread))
  return pieces, calls


def _union_ns(intervals) -> float:
  """Length of the union of ``(start, end)`` intervals."""
  total, reach = 0.0, -float("inf")
  for start, end in sorted(intervals):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


def case_jax_profile(params: Mapping[str, Any]) -> dict[str, Any]:
  """Where the jitted training step's time goes, op by op (``jax.profiler`` trace).

  Times ``steps`` steps untraced, then ``steps`` more under
  ``jax.profiler.trace``. Each op the runtime executed (on CPU: an XLA:CPU
  thunk, i.e. a fusion, a product, a convolution or a copy, with the pool
  tasks it scheduled; see ``trace_op_times``) is matched to its HLO
  instruction in ``compiled.as_text()``, which gives its category
  (``CATEGORIES``), the source line of the model it comes from and, for
  products and convolutions, its FLOPs.

  Per op and per category, per step: ``cpu_s``, the thread time spent on it
  (all threads together), and ``elapsed_s``, the time during which at least
  one thread worked on it; GFLOP/s is FLOPs / ``elapsed_s``. Per step: the
  wall time, ``span_s`` from the first op's start to the last op's end,
  ``busy_s`` (at least one thread on some op) and ``cpu_s`` (all threads).
  """
  import tempfile

  import jax

  batch_size, dtype = int(params["batch_size"]), params.get("dtype", "float32")
  steps = int(params.get("steps", 5))
  compiled, state, batch, compile_s, devices = _compiled_step(params, devices="one")
  text = compiled.as_text()
  module = re.match(r"HloModule\s+([\w.\-]+)", text).group(1)
  instrs, computations = parse_hlo(text)
  holder = {"state": state}

  def one():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready((holder["state"], metrics))

  for _ in range(int(params.get("warmup", 2))):
    one()
  wall = repeat(one, warmup=0, repeats=steps)
  with tempfile.TemporaryDirectory(prefix="dsf3n_profile_") as trace_dir:
    with jax.profiler.trace(trace_dir):
      traced = repeat(one, warmup=0, repeats=steps)
    pieces, calls = trace_op_times(trace_dir, module)

  # The last ``steps`` executions, each with the time pieces that fall in its span.
  spans: dict[Any, list[float]] = {}
  for op, run, start, end, _ in pieces:
    if op is not None:
      lo, hi = spans.get(run, (start, end))
      spans[run] = [min(lo, start), max(hi, end)]
  runs = sorted(spans, key=lambda r: spans[r][0])[-steps:]
  n = len(runs)
  if not n:
    raise RuntimeError(f"the trace holds no op of {module}")
  per_run: dict[Any, list[tuple]] = {r: [] for r in runs}
  for op, run, start, end, thread in pieces:
    if op is None:
      run = next((r for r in runs if spans[r][0] <= start < spans[r][1]), None)
    if run in per_run:
      per_run[run].append((op, start, end, thread))
  threads = {p[3] for r in runs for p in per_run[r] if p[0] is not None}

  def category_of(op):
    if op is None:
      return "runtime", 0.0
    return classify_hlo(op, instrs, computations) if op in instrs else ("other", 0.0)

  info = {op: category_of(op) for r in runs for op in {p[0] for p in per_run[r]}}
  cpu: dict[Any, list[float]] = {op: [] for op in info}
  elapsed: dict[Any, list[float]] = {op: [] for op in info}
  cat_elapsed: dict[str, list[float]] = {}
  span_s, busy_s, cpu_s = [], [], []
  for r in runs:
    by_op: dict[Any, list] = {op: [] for op in info}
    by_cat: dict[str, list] = {}
    for op, start, end, _ in per_run[r]:
      by_op[op].append((start, end))
      by_cat.setdefault(info[op][0], []).append((start, end))
    for op, intervals in by_op.items():
      cpu[op].append(sum(e - s for s, e in intervals) / 1e9)
      elapsed[op].append(_union_ns(intervals) / 1e9)
    for cat in {c for c, _ in info.values()}:
      cat_elapsed.setdefault(cat, []).append(_union_ns(by_cat.get(cat, [])) / 1e9)
    everything = [(s, e) for _, s, e, _ in per_run[r]]
    span_s.append((spans[r][1] - spans[r][0]) / 1e9)
    busy_s.append(_union_ns(everything) / 1e9)
    cpu_s.append(sum(e - s for s, e in everything) / 1e9)
  # Medians over the traced steps (a step slowed by other work on the host counts once).
  median_cpu = {op: statistics.median(v) for op, v in cpu.items()}
  total = sum(median_cpu.values())
  ops = []
  for op, seconds in median_cpu.items():
    category, flops = info[op]
    ins = instrs.get(op, {}) if op is not None else {}
    per_step = sum(calls[r, op] for r in runs) / n if op is not None else None
    flops *= per_step or 1.0
    el = statistics.median(elapsed[op])
    ops.append({"op": op or "(thunk executor, no op)", "category": category,
                "layer": _layer_of(ins.get("op_name", "")) if op else "(thunk executor)",
                "hlo": ins.get("opcode"), "shape": ins.get("shape"),
                "source": _short_op_name(ins.get("op_name", "")), "calls_per_step": per_step,
                "cpu_s": seconds, "elapsed_s": el, "share": seconds / total,
                "flops": flops, "gflops": flops / el / 1e9 if flops and el else None,
                "gflops_per_thread": flops / seconds / 1e9 if flops and seconds else None})
  ops.sort(key=lambda o: -o["cpu_s"])
  categories = []
  for cat in (*CATEGORIES, "control flow", "runtime"):
    members = [o for o in ops if o["category"] == cat]
    if members:
      sec = sum(o["cpu_s"] for o in members)
      flops = sum(o["flops"] for o in members)
      el = statistics.median(cat_elapsed[cat])
      categories.append({"category": cat, "ops": len(members), "cpu_s": sec, "elapsed_s": el,
                         "share": sec / total, "flops": flops,
                         "gflops": flops / el / 1e9 if flops and el else None,
                         "gflops_per_thread": flops / sec / 1e9 if flops and sec else None})
  categories.sort(key=lambda c: -c["cpu_s"])
  layers: dict[str, dict[str, Any]] = {}
  for o in ops:
    row = layers.setdefault(o["layer"], {"layer": o["layer"], "ops": 0, "cpu_s": 0.0,
                                         "flops": 0.0})
    row["ops"] += 1
    row["cpu_s"] += o["cpu_s"]
    row["flops"] += o["flops"]
  for row in layers.values():
    row["share"] = row["cpu_s"] / total
  cores = sysinfo.usable_cores()
  return {"batch_size": batch_size, "dtype": dtype, "device_kind": devices[0].device_kind,
          "module": module, "compile_s": compile_s, "steps_traced": n, "cores": cores,
          "threads": len(threads), "flops_per_step": _flops(compiled),
          "op_flops_per_step": sum(o["flops"] for o in ops),
          "wall_s": stats(wall), "traced_wall_s": stats(traced), "span_s": stats(span_s),
          "busy_s": stats(busy_s), "cpu_s": stats(cpu_s),
          "idle_core_s": stats([cores * sp - c for sp, c in zip(span_s, cpu_s)]),
          "samples_per_s": rates(batch_size, wall),
          "ops_per_step": sum(calls[r, op] for (r, op) in calls if r in per_run) / n,
          "distinct_ops": len(ops), "categories": categories,
          "layers": sorted(layers.values(), key=lambda r: -r["cpu_s"])[:int(params.get("top", 25))],
          "ops": ops[:int(params.get("top", 25))], "host_peak_bytes": host_peak_bytes()}


CASES: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "info": case_info,
    "matmul_peak": case_matmul_peak,
    "weights": case_weights,
    "jax_train": case_jax_train,
    "jax_epoch": case_jax_epoch,
    "jax_profile": case_jax_profile,
    "torch_train": case_torch_train,
    "embed": case_embed,
    "map_compare": case_map_compare,
    "map_scaling": case_map_scaling,
}
