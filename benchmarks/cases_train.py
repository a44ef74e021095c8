"""Cases of the JAX training step and epoch, and the machine's matmul peak."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np

from benchmarks import sysinfo
from benchmarks.harness import (
  device_peak_bytes,
  flops_of,
  host_peak_bytes,
  jax_setup,
  mesh_of,
  minor_faults,
  rates,
  repeat,
  stats,
  synthetic_batch,
)

# ----------------------------------------------------------------------------
# Cases.


def case_info(params: Mapping[str, Any]) -> dict[str, Any]:
  """Machine, accelerator, versions, threads and allocator as a child process sees them."""
  import torch  # noqa: F401  (so thread_settings reports torch's threads)
  return {"machine": sysinfo.machine_info(), "accelerator": sysinfo.accelerator_info(),
          "versions": sysinfo.versions(), "threads": sysinfo.thread_settings(),
          "allocator": sysinfo.active_allocator()}


def _matmul_forms(params: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
  """The products the peak is the best of: a square one and the model's bilinear product."""
  n = int(params["n"])
  rows, inner, cols = params["bilinear_shape"]
  return {"square": (n, n, n), "bilinear": (rows, inner, cols)}


def _matmul_call(shape: tuple[int, int, int], dtype: str) -> Callable[[], Any]:
  """A blocking call of the jitted (m, k) x (k, n) product in ``dtype``, accumulated in
  float32, compiled and run once."""
  import jax
  import jax.numpy as jnp
  m_, k_, n_ = shape
  key = jax.random.key(0)
  a = jax.random.normal(key, (m_, k_), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.fold_in(key, 1), (k_, n_), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  return lambda: f(a, b).block_until_ready()


def case_matmul_peak(params: Mapping[str, Any]) -> dict[str, Any]:
  """Matrix-multiply throughput of the JAX device, the ceiling the model is compared with.

  Square products (n x n x n) and the model's bilinear product ((3 B) x 65,536
  x 256) in float32, and both with bfloat16 operands and float32 accumulation.
  """
  import jax

  out: dict[str, Any] = {"device": jax.devices()[0].device_kind,
                         "precision": str(jax.config.jax_default_matmul_precision)}
  forms = _matmul_forms(params)
  for dtype in ("float32", "bfloat16"):
    # The forms in turn, each round: the peak is the median over rounds of the round's best,
    # as the interleaved peak of a step (``_interleaved_peak``) is.
    calls = {name: _matmul_call(shape, dtype) for name, shape in forms.items()}
    work = {name: 2.0 * np.prod(shape) / 1e9 for name, shape in forms.items()}
    for _ in range(int(params["warmup"])):
      for call in calls.values():
        call()
    times = {name: [] for name in forms}
    for _ in range(int(params["repeats"])):
      for name, call in calls.items():
        t0 = time.perf_counter()
        call()
        times[name].append(time.perf_counter() - t0)
    for name, shape in forms.items():
      out[f"{name}_{dtype}"] = {"shape": list(shape), "gflops": rates(work[name], times[name])}
    best = [max(work[f] / times[f][i] for f in forms) for i in range(int(params["repeats"]))]
    out[f"peak_{dtype}_gflops"] = statistics.median(best)
  return out


def _interleaved_peak(run: Callable[[], None], flops_per_run: float, params: Mapping[str, Any],
                      dtype: str) -> dict[str, Any]:
  """``run`` and the peak's products timed in turn, ``params["rounds"]`` times, in this process.

  Each round's fraction divides the round's rate by the best product of the same round, so a
  machine whose speed drifts between the peak job and this one (shared hosts move by a tenth
  within an hour) does not move the fraction.
  """
  calls = {name: (_matmul_call(shape, dtype), 2.0 * np.prod(shape) / 1e9)
           for name, shape in _matmul_forms(params).items()}
  gflops, peaks, fractions = [], [], []
  for _ in range(int(params["rounds"])):
    t0 = time.perf_counter()
    run()
    rate = flops_per_run / 1e9 / (time.perf_counter() - t0)
    best = 0.0
    for call, work in calls.values():
      t0 = time.perf_counter()
      call()
      best = max(best, work / (time.perf_counter() - t0))
    gflops.append(rate)
    peaks.append(best)
    fractions.append(rate / best)
  return {"rounds": len(fractions), "gflops": stats(gflops), "peak_gflops": stats(peaks),
          "fraction_of_peak": stats(fractions)}


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


def compiled_step(params: Mapping[str, Any], *, devices: str):
  """The jitted training step of ``params`` compiled for one synthetic batch.

  Returns:
    ``(compiled, state, batch, compile_s, devices, flops)``, state and batch placed on the
    mesh; ``flops``: XLA's count for the step (``step_flops``).
  """
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from dsf3n_jax import train
  batch_size, dtype = int(params["batch_size"]), params.get("dtype", "float32")
  cfg, _, model, tx, state = jax_setup(params, batch_size=batch_size, dtype=dtype)
  mesh, devs = mesh_of(devices)
  if batch_size % len(devs):
    raise ValueError(f"batch_size={batch_size} is not divisible by {len(devs)} devices")
  step = train.make_train_step(train.per_device_step(cfg, model, tx), mesh)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  batch = jax.device_put(synthetic_batch(batch_size), NamedSharding(mesh, P("data")))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  return compiled, state, batch, compile_s, devs, step_flops(cfg, model, tx, mesh, state, batch)


def step_flops(cfg, model, tx, mesh, state, batch) -> float | None:
  """XLA's FLOP count of the training step, with the bilinear product in one block: its cost
  analysis counts a loop's body once, not once per iteration (``layers.bilinear`` scans over
  blocks), so the blocked program would count one block's share."""
  from dsf3n_jax import train
  from dsf3n_jax.models import layers
  saved, layers.BILINEAR_BLOCK = layers.BILINEAR_BLOCK, None
  try:  # a new step function: traced afresh with one block
    step = train.make_train_step(train.per_device_step(cfg, model, tx), mesh)
    return flops_of(step.lower(state, batch))
  finally:
    layers.BILINEAR_BLOCK = saved


def case_jax_train(params: Mapping[str, Any]) -> dict[str, Any]:
  """One training step (forward, loss, backward, both optimiser updates), jitted.

  ``params["devices"]``: "one" (the first device) or "all" (data-parallel over
  every local device, the batch split on the ``data`` axis).
  """
  import jax

  batch_size, dtype = int(params["batch_size"]), params.get("dtype", "float32")
  compiled, state, batch, compile_s, devices, flops = compiled_step(
      params, devices=params.get("devices", "one"))
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
  interleaved = None
  if params.get("interleaved_peak") and flops:
    interleaved = _interleaved_peak(run, flops * steps, params["interleaved_peak"],
                                    "bfloat16" if dtype == "bfloat16" else "float32")
  loss = float(jax.device_get(compiled(holder["state"], batch)[1]["loss"]))
  return {"batch_size": batch_size, "dtype": dtype, "devices": len(devices),
          "device_kind": devices[0].device_kind, "compile_s": compile_s,
          "samples_per_s": rates(batch_size * steps, times),
          "flops_per_step": flops,
          "flops_per_sample": flops * len(devices) / batch_size if flops else None,
          "interleaved_peak": interleaved,
          "minor_faults_per_step": faults, "page_bytes_per_step": faults * resource.getpagesize(),
          "host_peak_bytes": host_peak_bytes(), "device_peak_bytes": device_peak_bytes(devices),
          "loss_finite": bool(np.isfinite(loss)), "allocator": sysinfo.active_allocator()}


def _recipe_evaluations(num_epochs: int, eval_every: int) -> int:
  """How many evaluations ``train_and_evaluate`` runs: every ``eval_every`` epochs and the last."""
  return sum(1 for e in range(1, num_epochs + 1)
             if e == num_epochs or (eval_every and e % eval_every == 0))


def _time_evaluation(cfg, model, state, mesh, params: Mapping[str, Any]) -> dict[str, Any]:
  """``train.evaluate`` (embed, loss, both mAPs) on a VEGAS-sized synthetic test split."""
  from dsf3n_jax import input_pipeline, losses, train
  n = int(params["eval_examples"])
  test = synthetic_batch(n, seed=2)
  source = input_pipeline.ArraySource(test["visual"], test["audio"], test["label"])
  cfg.eval_batch_size = int(params.get("eval_batch_size", cfg.eval_batch_size))
  embed_fn = train.make_embed_fn(model, mesh)
  loss_fn = losses.loss_from_config(cfg.loss)  # one per run, as training has (Run.eval_loss_fn)
  out: dict[str, Any] = {"examples": n, "batch_size": cfg.eval_batch_size}
  rounds = int(params.get("protocol_rounds", 1))
  try:
    t0 = time.perf_counter()
    result = train.evaluate(embed_fn, state, source, config=cfg, mesh=mesh, loss_fn=loss_fn)
    out["first_call_s"] = time.perf_counter() - t0  # compiles the embedding and the mAP
    out["map_average"] = result["map_average"]
    if rounds:  # the warm evaluation and pass (both protocols) are among the protocols' own
      protocols = _time_protocols(cfg, model, state, mesh, source, loss_fn, rounds=rounds,
                                  compiled=("embed_both", "final_evaluation"))
      out.update(protocols=protocols, evaluate_s=protocols["final_evaluation_s"],
                 embed_s=protocols["embed_both_s"])
    else:
      t0 = time.perf_counter()
      train.evaluate(embed_fn, state, source, config=cfg, mesh=mesh, loss_fn=loss_fn)
      out["evaluate_s"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      train.embed_split(embed_fn, state.variables, source, mesh=mesh,
                        batch_size=cfg.eval_batch_size)
      out["embed_s"] = time.perf_counter() - t0
  except Exception as e:  # the epoch figures stand without it
    out["error"] = f"{type(e).__name__}: {e}"
  return out


# The evaluation a run does with only each protocol: an intermediate one under the paper's
# recipe (paired), one under the :unimodal recipe's, and the last one (both).
_EVALUATION_OF = {"paired": "selection", "unimodal": "unimodal", "both": "final"}


def _time_protocols(cfg, model, state, mesh, source, loss_fn, *, rounds: int,
                    compiled: Collection[str] = ()) -> dict[str, Any]:
  """Seconds of a warm embedding pass per protocol, and of the evaluations a run does.

  ``selection_evaluation_s``: an intermediate evaluation under the paper's recipe (selection
  on ``map_average``: the paired pass, its loss and mAP); ``unimodal_evaluation_s``: one
  under the :unimodal recipe's (each modality alone, its mAP); ``final_evaluation_s``: both
  protocols (the last evaluation). Every one is compiled and run once first (except those
  of ``compiled``, which the caller has run), then timed in turn, ``rounds`` times
  (``rounds_s``: each round's seconds). ``<name>_s`` is the median over the rounds;
  ``<name>_over_paired_pass`` the median of each round's ratio to the same round's paired
  pass (a host whose speed drifts within the job does not move it),
  ``<name>_over_paired_pass_range`` their least and greatest.
  """
  from dsf3n_jax import train
  work: dict[str, Callable[[], Any]] = {}
  for protocol, name in _EVALUATION_OF.items():
    embed_fn = train.make_embed_fn(model, mesh, protocol=protocol)

    def embed(embed_fn=embed_fn):
      return train.embed_split(embed_fn, state.variables, source, mesh=mesh,
                               batch_size=cfg.eval_batch_size)

    def evaluation(embed=embed, protocol=protocol):
      train.evaluate(None, state, source, config=cfg, mesh=mesh, outputs=embed(),
                     protocol=protocol, loss_fn=loss_fn)

    work[f"embed_{protocol}"], work[f"{name}_evaluation"] = embed, evaluation
  for key, fn in work.items():  # compiles
    if key not in compiled:
      fn()
  times: dict[str, list[float]] = {k: [] for k in work}
  for _ in range(rounds):
    for key, fn in work.items():
      (seconds,) = repeat(fn, warmup=0, repeats=1)
      times[key].append(seconds)
  out: dict[str, Any] = {"rounds": len(times["embed_paired"]), "rounds_s": times}
  paired = times["embed_paired"]
  for key, values in times.items():
    out[f"{key}_s"] = float(np.median(values))
    if key != "embed_paired":
      ratios = [t / p for t, p in zip(values, paired)]
      out[f"{key}_over_paired_pass"] = float(np.median(ratios))
      out[f"{key}_over_paired_pass_range"] = [min(ratios), max(ratios)]
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
  that size: the first call (with its compiles), then each protocol's embedding pass and
  evaluation, in turn, ``protocol_rounds`` times (default 1; ``_time_protocols``), the warm
  evaluation and pass of both protocols among them (0: no protocol alone, those two timed
  once). The recipe
  (``num_epochs`` and ``eval_every_epochs`` of the default config) is
  extrapolated as compile + epochs x the median epoch + the first evaluation
  + the other evaluations x the warm one; the epoch is scaled linearly to
  ``recipe_examples`` when the measured one is smaller.
  """
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from dsf3n_jax import input_pipeline, train
  batch_size, num_examples = int(params["batch_size"]), int(params["num_examples"])
  steps = num_examples // batch_size
  cfg, _, model, tx, host_state = jax_setup(params, batch_size=batch_size,
                                            steps_per_epoch=steps)
  on_device = train.resolve_on_device(params.get("on_device", "auto"))
  mesh, devices = mesh_of(params.get("devices", "one"))
  data = synthetic_batch(num_examples, seed=1)
  holder: dict[str, Any] = {"state": jax.device_put(host_state, NamedSharding(mesh, P())),
                            "epoch": 0}
  out: dict[str, Any] = {"mode": "scan" if on_device else "streaming",
                         "on_device_param": str(params.get("on_device", "auto")),
                         "backend": jax.default_backend(), "batch_size": batch_size,
                         "num_examples": num_examples, "steps": steps, "devices": len(devices)}
  source = input_pipeline.ArraySource(data["visual"], data["audio"], data["label"])
  epoch = _scan_epoch if on_device else _streamed_epoch
  run, finish = epoch(train.per_device_step(cfg, model, tx), cfg, holder, source, mesh,
                      batch_size=batch_size, steps=steps, out=out)
  times = repeat(run, warmup=int(params.get("warmup", 0)), repeats=int(params["repeats"]),
                 budget_s=params.get("budget_s", float("inf")))
  finish()
  out.update(epoch_s=stats(times), samples_per_s=rates(steps * batch_size, times),
             loss_finite=bool(np.all(np.isfinite(holder["loss"]))),
             host_peak_bytes=host_peak_bytes(), device_peak_bytes=device_peak_bytes(devices))
  if int(params.get("eval_examples", 0)):
    out["evaluation"] = _time_evaluation(cfg, model, holder["state"], mesh, params)
  out["recipe"] = _recipe(cfg, params, out, times, batch_size=batch_size, steps=steps,
                          num_examples=num_examples)
  return out


def _scan_epoch(step_fn, cfg, holder, source, mesh, *, batch_size, steps, out):
  """The on-device epoch (``train.make_train_epoch``): ``(run one epoch, finish)``."""
  import jax
  import jax.numpy as jnp
  del steps
  compiled, arrays, out["device_put_s"], out["compile_s"] = compiled_scan_epoch(
      step_fn, cfg, holder["state"], source, mesh, batch_size=batch_size,
      num_examples=len(source))

  def run():
    holder["state"], metrics = compiled(holder["state"], arrays,
                                        jnp.asarray(holder["epoch"], jnp.int32))
    jax.block_until_ready(holder["state"])
    holder["loss"] = np.asarray(metrics["loss"])
    holder["epoch"] += 1

  return run, lambda: None


def _streamed_epoch(step_fn, cfg, holder, source, mesh, *, batch_size, steps, out):
  """The streamed epoch as the trainer runs it (``TrainLoader`` + ``train.run_steps``):
  ``(run one epoch, finish)``; ``finish`` times one more epoch of batches alone."""
  import jax

  from dsf3n_jax import input_pipeline, train
  loader = input_pipeline.TrainLoader(source, global_batch_size=batch_size, mesh=mesh,
                                      seed=cfg.seed, shuffle=cfg.data.shuffle)
  batches = iter(loader)
  # A batch of the loader's structure (with "index") from a throwaway loader, to lower with.
  probe = input_pipeline.TrainLoader(source, global_batch_size=batch_size, mesh=mesh,
                                     prefetch=False)
  example = next(probe)
  probe.close()
  t0 = time.perf_counter()
  compiled = train.make_train_step(step_fn, mesh).lower(holder["state"], example).compile()
  out["compile_s"] = time.perf_counter() - t0

  def run():
    holder["state"], metrics = train.run_steps(compiled, holder["state"], batches,
                                               steps=steps, log_every=int(cfg.log_every_steps))
    holder["loss"] = metrics["loss"]
    holder["epoch"] += 1

  def finish():  # the input pipeline alone: one more epoch of batches, no step
    t0 = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(next(batches))
    out["loader_epoch_s"] = time.perf_counter() - t0
    loader.close()

  return run, finish


def _recipe(cfg, params, out, times, *, batch_size: int, steps: int,
            num_examples: int) -> dict[str, Any]:
  """The default config's epochs and evaluations, extrapolated at ``recipe_examples``."""
  recipe_examples = int(params.get("recipe_examples", num_examples))
  recipe_steps = recipe_examples // batch_size
  epoch_s = statistics.median(times) * recipe_steps / steps
  evaluations = _recipe_evaluations(int(cfg.num_epochs), int(cfg.eval_every_epochs))
  evaluation = out.get("evaluation", {})
  train_s = out["compile_s"] + cfg.num_epochs * epoch_s
  total_s = None
  by_protocol = bool(evaluation.get("protocols"))
  if "evaluate_s" in evaluation:
    # As the loop evaluates: intermediate evaluations compute what selection needs (the
    # paired pass under the paper's recipe), the last both protocols.
    protocols = evaluation.get("protocols", {})
    middle = protocols.get("selection_evaluation_s", evaluation["evaluate_s"])
    last = protocols.get("final_evaluation_s", evaluation["evaluate_s"])
    total_s = (train_s + evaluation["first_call_s"] + max(evaluations - 2, 0) * middle
               + (last if evaluations > 1 else 0.0))
  return {
      "epochs": int(cfg.num_epochs), "examples": recipe_examples, "steps_per_epoch": recipe_steps,
      "epoch_s": epoch_s, "scaled_from_steps": steps if recipe_steps != steps else None,
      "evaluations": evaluations, "evaluation_s": evaluation.get("evaluate_s"),
      "evaluation_examples": evaluation.get("examples"), "train_s": train_s, "total_s": total_s,
      "includes": ("compile of the step + epochs x one epoch (batches, step, metrics)"
                   + ((" + the evaluations (the first with its compiles; the intermediate "
                       "ones of the selection protocol, paired; the last of both protocols)"
                       if by_protocol else " + the evaluations (the first with its compiles; "
                       "every other one of both protocols: this job times no protocol alone)")
                      if total_s else "")
                   + "; not included: reading the data from disk, checkpoints"),
  }


