"""Runs of one process: a later run that reuses the train programs of an earlier one.

  python -m benchmarks.repeat_runs                  # the tiny model, 3 rounds
  python -m benchmarks.repeat_runs --rounds=1 --out=DIR

``train_and_evaluate`` keeps the programs a run compiled for later runs of the process whose
configs differ only in what the loop reads (``training.loop.programs_key``): a sweep written
as a loop, a notebook, a test suite. The same short run (the synthetic data,
``configs/synthetic.py:runlocal,tiny``, 2 epochs, streamed) is trained into new workdirs,
with JAX's persistent compilation cache in a new temporary folder:

* ``compiled``: once, first: everything traced, lowered and compiled;
* then each round ``forgotten``: after ``state.forget_programs``, traced and lowered anew,
  the executables loaded from the persistent cache (what a new process that compiled them
  before does, its imports aside);
* and ``reused``: right after it, with other checkpoint, log and evaluation intervals: the
  train step, the initialiser and the embedding programs are the forgotten run's.

It checks that every run ends with the same parameters, bit for bit. Times are wall and CPU
seconds of the whole ``train_and_evaluate`` (data, init, steps, evaluations, checkpoints).
Writes ``repeat-runs-<machine>.json`` and ``.md`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

from benchmarks import accuracy, sysinfo

CONFIG = "runlocal,tiny"
KINDS = ("compiled", "forgotten", "reused")


def measure(rounds: int) -> dict:
  import jax
  import numpy as np
  from flax import traverse_util

  from configs import synthetic
  from dsf3n_jax import train
  from dsf3n_jax.training import state as state_lib

  def config(**loop):
    c = synthetic.get_config(CONFIG)
    c.num_epochs, c.data.on_device = 2, "false"
    for key, value in loop.items():
      c[key] = value
    return c

  def params(workdir):
    _, variables, _ = train.restore_model(workdir)
    return traverse_util.flatten_dict(jax.device_get(variables), sep="/")

  times = {kind: {"wall_s": [], "cpu_s": []} for kind in KINDS}
  cache_dir = jax.config.jax_compilation_cache_dir
  with tempfile.TemporaryDirectory() as tmp:
    jax.config.update("jax_compilation_cache_dir", f"{tmp}/cache")  # before the first compile
    plan = [("compiled", config())]
    for _ in range(rounds):
      plan += [("forgotten", config()), ("reused", config(
          checkpoint_every_epochs=2, log_every_steps=3, eval_every_epochs=2))]
    first = None
    for i, (kind, run) in enumerate(plan):
      if kind != "reused":
        state_lib.forget_programs()
      t0, c0 = time.perf_counter(), time.process_time()
      train.train_and_evaluate(run, f"{tmp}/{i}")
      times[kind]["wall_s"].append(time.perf_counter() - t0)
      times[kind]["cpu_s"].append(time.process_time() - c0)
      trained = params(f"{tmp}/{i}")
      first = first or trained
      for key, value in first.items():
        if np.asarray(value).tobytes() != np.asarray(trained[key]).tobytes():
          raise AssertionError(f"the {kind} run {i} trained other parameters: {key}")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
  return {"config": f"configs/synthetic.py:{CONFIG}", "epochs": 2, "rounds": rounds,
          **{kind: {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                    for k, v in t.items()} for kind, t in times.items()}}


def markdown(doc: dict) -> str:
  row = doc["row"]
  lines = [f"# Runs of one process ({doc['machine']['cpu_model']}, {doc['started']})", "",
           f"`{doc['command']}`; {doc['accelerator']['jax_backend']}; "
           f"`{row['config']}`, {row['epochs']} epochs, streamed; medians of {row['rounds']} "
           "rounds (min-max; the compiled run once). Every run ended with the same "
           "parameters, bit for bit.", "", "| run | wall s | CPU s |", "|---|---|---|"]

  def cell(t):
    return f"{t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f})"

  for kind in KINDS:
    lines.append(f"| {kind} | {cell(row[kind]['wall_s'])} | {cell(row[kind]['cpu_s'])} |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.repeat_runs", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=None)
  raw = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(raw)
  if args.rounds < 1:
    parser.error(f"--rounds={args.rounds}: expected at least 1")
  machine = sysinfo.machine_info()  # before the runs: its date is the start
  doc = {**sysinfo.report_header("repeat_runs", raw, machine), "row": measure(args.rounds)}
  name = "repeat-runs-" + sysinfo.machine_slug(machine, doc["accelerator"])
  accuracy.publish(args.out, name, doc, markdown(doc))
  return 0


if __name__ == "__main__":
  sys.exit(main())
