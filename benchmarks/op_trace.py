"""Where each op's time went, from a ``jax.profiler`` trace (no TensorFlow needed)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

# An op traced in the model's forward ("jvp") or backward ("transpose(jvp)") pass, also
# inside a loop body: "jit(f)/while/body/closed_call/transpose(jvp(M))/a/b/dot_general".
_MODEL_OP = re.compile(r"^jit\([^)]*\)/(?:[^()]*?/)?(transpose\(jvp\([^)]*\)\)|jvp\([^)]*\))/(.*)$")


def short_op_name(op_name: str) -> str:
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
