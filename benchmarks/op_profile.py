"""The opt-in per-op profile of the compiled training step (the ``jax_profile`` case).

The HLO parser is ``benchmarks.hlo``; the trace reader ``benchmarks.op_trace``.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping
from typing import Any

from benchmarks import sysinfo
from benchmarks.cases_train import compiled_step
from benchmarks.harness import (
  host_peak_bytes,
  rates,
  repeat,
  stats,
)
from benchmarks.hlo import CATEGORIES, classify_hlo, parse_hlo
from benchmarks.op_trace import layer_of, short_op_name, trace_op_times


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
  compiled, state, batch, compile_s, devices, flops = compiled_step(params, devices="one")
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

  runs, per_run, spans = _last_runs(pieces, steps, module)
  n = len(runs)
  threads = {p[3] for r in runs for p in per_run[r] if p[0] is not None}

  def category_of(op):
    if op is None:
      return "runtime", 0.0
    return classify_hlo(op, instrs, computations) if op in instrs else ("other", 0.0)

  info = {op: category_of(op) for r in runs for op in {p[0] for p in per_run[r]}}
  times = _times(runs, per_run, spans, info)
  span_s, busy_s, cpu_s = times["span_s"], times["busy_s"], times["cpu_s"]
  # Medians over the traced steps (a step slowed by other work on the host counts once).
  median_cpu = {op: statistics.median(v) for op, v in times["cpu"].items()}
  total = sum(median_cpu.values())
  ops = _op_rows(median_cpu, info, instrs, calls, runs, times["elapsed"], total)
  categories = _category_rows(ops, times["cat_elapsed"], total)
  layers = _layer_rows(ops, total)
  cores = sysinfo.usable_cores()
  return {"batch_size": batch_size, "dtype": dtype, "device_kind": devices[0].device_kind,
          "module": module, "compile_s": compile_s, "steps_traced": n, "cores": cores,
          "threads": len(threads), "flops_per_step": flops,
          "op_flops_per_step": sum(o["flops"] for o in ops),
          "wall_s": stats(wall), "traced_wall_s": stats(traced), "span_s": stats(span_s),
          "busy_s": stats(busy_s), "cpu_s": stats(cpu_s),
          "idle_core_s": stats([cores * sp - c for sp, c in zip(span_s, cpu_s)]),
          "samples_per_s": rates(batch_size, wall),
          "ops_per_step": sum(calls[r, op] for (r, op) in calls if r in per_run) / n,
          "distinct_ops": len(ops), "categories": categories,
          "layers": layers[:int(params.get("top", 25))],
          "ops": ops[:int(params.get("top", 25))], "host_peak_bytes": host_peak_bytes()}


def _last_runs(pieces, steps: int, module: str):
  """The last ``steps`` executions, each with the time pieces that fall in its span."""
  spans: dict[Any, list[float]] = {}
  for op, run, start, end, _ in pieces:
    if op is not None:
      lo, hi = spans.get(run, (start, end))
      spans[run] = [min(lo, start), max(hi, end)]
  runs = sorted(spans, key=lambda r: spans[r][0])[-steps:]
  if not runs:
    raise RuntimeError(f"the trace holds no op of {module}")
  per_run: dict[Any, list[tuple]] = {r: [] for r in runs}
  for op, run, start, end, thread in pieces:
    if op is None:
      run = next((r for r in runs if spans[r][0] <= start < spans[r][1]), None)
    if run in per_run:
      per_run[run].append((op, start, end, thread))
  return runs, per_run, spans


def _times(runs, per_run, spans, info) -> dict[str, Any]:
  """Per run: thread time and elapsed time per op and per category; span, busy and cpu."""
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
  return {"cpu": cpu, "elapsed": elapsed, "cat_elapsed": cat_elapsed, "span_s": span_s,
          "busy_s": busy_s, "cpu_s": cpu_s}


def _op_rows(median_cpu, info, instrs, calls, runs, elapsed, total) -> list[dict[str, Any]]:
  """One row per op (its category, layer, source, calls, seconds, FLOP/s), costliest first."""
  n = len(runs)
  ops = []
  for op, seconds in median_cpu.items():
    category, flops = info[op]
    ins = instrs.get(op, {}) if op is not None else {}
    per_step = sum(calls[r, op] for r in runs) / n if op is not None else None
    flops *= per_step or 1.0
    el = statistics.median(elapsed[op])
    ops.append({"op": op or "(thunk executor, no op)", "category": category,
                "layer": layer_of(ins.get("op_name", "")) if op else "(thunk executor)",
                "hlo": ins.get("opcode"), "shape": ins.get("shape"),
                "source": short_op_name(ins.get("op_name", "")), "calls_per_step": per_step,
                "cpu_s": seconds, "elapsed_s": el, "share": seconds / total,
                "flops": flops, "gflops": flops / el / 1e9 if flops and el else None,
                "gflops_per_thread": flops / seconds / 1e9 if flops and seconds else None})
  ops.sort(key=lambda o: -o["cpu_s"])
  return ops


def _category_rows(ops, cat_elapsed, total) -> list[dict[str, Any]]:
  """The ops summed per category (``CATEGORIES``, control flow, runtime), costliest first."""
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
  return sorted(categories, key=lambda c: -c["cpu_s"])


def _layer_rows(ops, total) -> list[dict[str, Any]]:
  """The ops summed per model layer, costliest first."""
  layers: dict[str, dict[str, Any]] = {}
  for o in ops:
    row = layers.setdefault(o["layer"], {"layer": o["layer"], "ops": 0, "cpu_s": 0.0,
                                         "flops": 0.0})
    row["ops"] += 1
    row["cpu_s"] += o["cpu_s"]
    row["flops"] += o["flops"]
  for row in layers.values():
    row["share"] = row["cpu_s"] / total
  return sorted(layers.values(), key=lambda r: -r["cpu_s"])
