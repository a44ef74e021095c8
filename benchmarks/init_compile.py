"""Compile and run time of the initialiser: its threefry hashes made together
(``dsf3n_jax.fused_draws``, what training uses) against one hash per fold-in and draw.

  python -m benchmarks.init_compile                     # the tiny and the full model, 3 rounds
  python -m benchmarks.init_compile --model=tiny --rounds=1 --out=DIR

Each round compiles both programs afresh (no compilation cache), one after the other, with
the training's compiler options (``training.state.init_compiler_options``), and runs each
once; it checks that both draw the same bits. Compile time is given in wall and in CPU
seconds (XLA:CPU compiles on a thread pool). Writes ``init-compile-<machine>.json`` and
``.md`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

from benchmarks import accuracy, sysinfo
from benchmarks.seeds import MODELS


def measure(model: str, rounds: int) -> dict:
  import jax
  import numpy as np

  from configs import default
  from dsf3n_jax.fused_draws import fused_draws
  from dsf3n_jax.training import state as state_lib

  config = default.get_config(MODELS[model])
  net = state_lib.build_model(state_lib.model_config(config, num_classes=10, visual_dim=1024,
                                                     audio_dim=128))
  terms = tuple(config.loss.terms)

  def initialiser():  # a new function: jit remembers a function's lowering and executable
    return lambda key: state_lib._init_without_optimizer(net, key, 10, terms)

  options = state_lib.init_compiler_options(jax.default_backend())
  key = jax.random.key(0)
  times = {name: {"compile_s": [], "compile_cpu_s": [], "run_s": []}
           for name in ("one_hash_each", "fused")}
  for _ in range(rounds):
    states = {}
    for name, fn in (("one_hash_each", initialiser()), ("fused", fused_draws(initialiser()))):
      lowered = jax.jit(fn, compiler_options=options).lower(key)
      t0, c0 = time.perf_counter(), time.process_time()
      compiled = lowered.compile()
      t1, c1 = time.perf_counter(), time.process_time()
      states[name] = jax.block_until_ready(compiled(key))
      t2 = time.perf_counter()
      times[name]["compile_s"].append(t1 - t0)
      times[name]["compile_cpu_s"].append(c1 - c0)
      times[name]["run_s"].append(t2 - t1)
    for a, b in zip(jax.tree.leaves(states["one_hash_each"]), jax.tree.leaves(states["fused"])):
      if np.asarray(a).tobytes() != np.asarray(b).tobytes():
        raise AssertionError(f"{model}: the fused initialiser drew other bits")
  leaves = jax.tree.leaves(jax.eval_shape(initialiser(), key).params)
  return {"model": model, "config": MODELS[model], "parameters": len(leaves),
          "elements": int(sum(x.size for x in leaves)), "rounds": rounds,
          **{name: {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                    for k, v in t.items()} for name, t in times.items()}}


def markdown(doc: dict) -> str:
  lines = [f"# Initialiser compile time ({doc['machine']['cpu_model']}, {doc['started']})", "",
           f"`{doc['command']}`; {doc['accelerator']['jax_backend']}, compiler options "
           f"{doc['compiler_options']}; medians of {doc['rows'][0]['rounds']} rounds "
           "(min-max). Both programs drew the same bits.", "",
           "| model | parameters | elements | compile s, one hash each | compile s, fused "
           "| compile CPU s, one hash each | compile CPU s, fused | run s, one hash each "
           "| run s, fused |", "|---|---|---|---|---|---|---|---|---|"]

  def cell(t):
    return f"{t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f})"

  for r in doc["rows"]:
    a, b = r["one_hash_each"], r["fused"]
    lines.append(f"| {r['model']} | {r['parameters']} | {r['elements']:,} | "
                 f"{cell(a['compile_s'])} | {cell(b['compile_s'])} | "
                 f"{cell(a['compile_cpu_s'])} | {cell(b['compile_cpu_s'])} | "
                 f"{cell(a['run_s'])} | {cell(b['run_s'])} |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.init_compile", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", action="append", default=[], choices=tuple(MODELS))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=None)
  raw = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(raw)
  import jax

  from dsf3n_jax.training import state as state_lib

  machine = sysinfo.machine_info()  # before the runs: its date is the start
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)  # compiled, not loaded
  try:
    rows = [measure(model, args.rounds) for model in args.model or list(MODELS)]
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  doc = {**sysinfo.report_header("init_compile", raw, machine),
         "compiler_options": state_lib.init_compiler_options(jax.default_backend()),
         "rows": rows}
  name = "init-compile-" + sysinfo.machine_slug(machine, doc["accelerator"])
  accuracy.publish(args.out, name, doc, markdown(doc))
  return 0


if __name__ == "__main__":
  sys.exit(main())
