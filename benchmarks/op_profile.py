"""The opt-in per-op profile of the compiled training step: HLO parser, trace reader, case."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmarks import sysinfo
from benchmarks.cases_train import compiled_step
from benchmarks.harness import (
  flops_of,
  host_peak_bytes,
  rates,
  repeat,
  stats,
)

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


def layer_of(op_name: str) -> str:
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
      items = _line_items(line, module, calls, device if on_device else None, thread)
      _walk_line(items, thread, pieces, tasks, owner)
  if device:
    return device, calls
  return pieces + _charged_tasks(tasks, owner), calls


def _line_items(line, module: str, calls: Counter, device: list | None,
                thread: str) -> list[tuple]:
  """A thread's events as sorted ``(time, order, kind, value)``: op and runtime regions
  pushed and popped, pool task starts, stops and records. Device ops go to ``device``."""
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
        if device is not None:
          device.append((key[0], key[1], start, end, thread))
          continue
    items += [(start, 1, "push", ctx), (end, 0, "pop", ctx)]
  items.sort(key=lambda x: (x[0], x[1]))
  return items


def _walk_line(items, thread: str, pieces: list, tasks: list, owner: dict) -> None:
  """Charges each stretch of a thread's time to the innermost open op (``pieces``) or to
  the pool task it runs (``tasks``), and records which op or task scheduled each task."""
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


def _charged_tasks(tasks, owner) -> list[tuple]:
  """Pool task time charged to the op that scheduled the task (through tasks that schedule
  tasks); tasks of another module are dropped, tasks of no op charged to ``None``."""
  pieces = []
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
  return pieces


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
  compiled, state, batch, compile_s, devices = compiled_step(params, devices="one")
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
          "threads": len(threads), "flops_per_step": flops_of(compiled),
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
                "source": _short_op_name(ins.get("op_name", "")), "calls_per_step": per_step,
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
