"""Throughput of K seeds trained together (one vmapped program) against K separate runs.

  python -m benchmarks.seeds                      # K = 1, 2, 4; the tiny and the full model
  python -m benchmarks.seeds --k=2 --k=4 --model=tiny --steps=20 --out=DIR

Each case times ``steps`` train steps on synthetic data of VEGAS's input sizes
after a warm-up step (compile excluded; the compile time is reported apart):
"together" is ``training.seeds.make_seeds_step`` on K stacked states, "one by
one" is K states each stepped by ``steps.make_train_step`` in turn, the way K
separate runs of one process would share the machine. Writes
``seeds-<machine>.json`` and ``.md`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Sequence

from benchmarks import accuracy, sysinfo

MODELS = {"tiny": "runlocal,tiny", "full": "runlocal"}


def _config(model: str, batch_size: int):
  config = accuracy.load_config("synthetic", MODELS[model])
  config.batch_size = batch_size
  config.data.synthetic.num_train = max(4 * batch_size, 256)
  config.data.validation_fraction = 0.0
  return config


def measure(model: str, k: int, *, steps: int, batch_size: int) -> dict:
  """Samples/s (over all seeds) of K seeds together and one by one, and compile seconds."""
  import jax

  from dsf3n_jax import input_pipeline
  from dsf3n_jax.training import run as run_lib
  from dsf3n_jax.training import seeds as seeds_lib
  from dsf3n_jax.training import steps as steps_lib

  config = _config(model, batch_size)
  run = run_lib.prepare_run(config)
  seeds = list(range(k))
  step_fn = steps_lib.per_device_step(config, run.model, run.tx)
  batches = seeds_lib.SeedBatches(run.sources.train, seeds=seeds, global_batch_size=batch_size,
                                  mesh=run.mesh)
  together = seeds_lib.make_seeds_step(step_fn, run.mesh)
  states = seeds_lib.init_states(run, seeds)
  t0 = time.perf_counter()
  states, m = together(states, next(batches))
  jax.block_until_ready(m)
  compile_together = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    states, m = together(states, next(batches))
  jax.block_until_ready(m)
  together_s = time.perf_counter() - t0
  batches.close()

  single = steps_lib.make_train_step(step_fn, run.mesh)
  alone = [seeds_lib.seed_state(seeds_lib.init_states(run, [s]), 0) for s in seeds]
  loaders = [input_pipeline.TrainLoader(run.sources.train, global_batch_size=batch_size,
                                        mesh=run.mesh, seed=s) for s in seeds]
  t0 = time.perf_counter()
  alone[0], m = single(alone[0], next(loaders[0]))
  jax.block_until_ready(m)
  compile_single = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    for i in range(k):
      alone[i], m = single(alone[i], next(loaders[i]))
  jax.block_until_ready(m)
  separate_s = time.perf_counter() - t0
  for loader in loaders:
    loader.close()
  samples = steps * k * batch_size
  return {"model": model, "k": k, "steps": steps, "batch_size": batch_size,
          "together_samples_per_s": samples / together_s,
          "one_by_one_samples_per_s": samples / separate_s,
          "speedup": separate_s / together_s,
          "compile_s": {"together": compile_together, "single": compile_single}}


def markdown(doc: dict) -> str:
  m, acc = doc["machine"], doc["accelerator"]
  lines = ["## K seeds together (one vmapped program) vs one by one", "",
           f"- Machine: {m['cpu_model']}, {m['cores']} cores; JAX backend {acc['jax_backend']} "
           f"({acc['jax_devices']} x {acc['jax_device_kind']}); date {doc['started']}",
           f"- Command: `{doc['command']}`",
           "- Samples/s over all seeds, compile excluded; batch per seed as given", "",
           "| model | K | batch | together (samples/s) | one by one (samples/s) | speed-up | "
           "compile together / single (s) |", "|---|---|---|---|---|---|---|"]
  for r in doc["rows"]:
    lines.append(f"| {r['model']} | {r['k']} | {r['batch_size']} | "
                 f"{r['together_samples_per_s']:.1f} | {r['one_by_one_samples_per_s']:.1f} | "
                 f"{r['speedup']:.2f}x | {r['compile_s']['together']:.1f} / "
                 f"{r['compile_s']['single']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.seeds", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--k", type=int, action="append", default=[], help="seeds (repeatable)")
  parser.add_argument("--model", action="append", default=[], choices=tuple(MODELS))
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--out", default=None)
  raw = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(raw)
  rows = []
  for model in args.model or list(MODELS):
    for k in args.k or [1, 2, 4]:
      rows.append(measure(model, k, steps=args.steps, batch_size=args.batch_size))
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  machine = sysinfo.machine_info()
  doc = {"benchmark": "seeds", "command": " ".join(["python -m benchmarks.seeds", *raw]),
         "started": machine["date"], "machine": machine,
         "accelerator": sysinfo.accelerator_info(), "versions": sysinfo.versions(),
         "rows": rows}
  acc = doc["accelerator"]
  tag = ("gpu-" + str(acc["jax_device_kind"]).lower().replace(" ", "-")
         if acc["jax_backend"] == "gpu" else f"cpu-{machine['cores']}c")
  for path in accuracy.write_files(pathlib.Path(args.out) if args.out else accuracy.RESULTS,
                                   f"seeds-{tag}", doc, markdown(doc)):
    print(f"wrote {path}", file=sys.stderr)
  print(markdown(doc))
  return 0


if __name__ == "__main__":
  sys.exit(main())
