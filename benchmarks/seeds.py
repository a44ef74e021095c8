"""Throughput of K seeds, or K configurations, trained together (one vmapped program)
against K separate runs.

  python -m benchmarks.seeds                      # K = 1, 2, 4; the tiny and the full model
  python -m benchmarks.seeds --k=2 --k=4 --model=tiny --steps=20 --out=DIR
  python -m benchmarks.seeds --members=configs    # K configurations (a sweep's group)
  python -m benchmarks.seeds --model=smoke --k=2 --steps=1   # the smallest model: a check

Each case times ``steps`` train steps on synthetic data of VEGAS's input sizes
after a warm-up step (compile excluded; the compile time is reported apart).
``--members=seeds``: "together" is ``training.seeds.make_seeds_step`` on K stacked
states, "one by one" is K states each stepped by ``steps.make_train_step`` in turn,
the way K separate runs of one process would share the machine.
``--members=configs``: K configurations of the ``:unimodal`` recipe that differ in
learning rate, partner dropout and a loss weight; "together" is a sweep's group
(``steps.per_device_hyper_step``, the values stacked and traced), "one by one" is
each configuration's own step (its values constants: one compile per
configuration, all counted). Writes ``seeds-<machine>.json`` and ``.md`` (default
benchmarks/results/; ``sweep-<machine>`` for configurations).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from benchmarks import accuracy, sysinfo

MODELS = {"tiny": "runlocal,tiny", "full": "runlocal", "smoke": "runlocal,tiny"}
# ``smoke``: the tiny model narrowed to ``benchmarks.run``'s smoke model (one branch of one
# stage, one fusion stage): a check of the benchmark's machinery, not a measurement, and not
# among the default models. Its steps compile faster: the test of ``--members=configs
# --k=2`` took 25 s of CPU with it against 40 s with ``tiny`` (2-core AMD EPYC).
DEFAULT_MODELS = ("tiny", "full")


def _config(model: str, batch_size: int, *, unimodal: bool = False):
  config = accuracy.load_config("synthetic", MODELS[model] + (",unimodal" if unimodal else ""))
  if model == "smoke":
    from benchmarks.run import SMOKE_MODEL
    for key, value in SMOKE_MODEL.items():
      config.model[key] = value
  config.batch_size = batch_size
  config.data.synthetic.num_train = max(4 * batch_size, 256)
  config.data.validation_fraction = 0.0
  return config


def member_configs(model: str, k: int, batch_size: int):
  """K configurations of one program: the ``:unimodal`` recipe with learning rate, partner
  dropout and the unimodal centre weight varied (a sweep's group)."""
  configs = []
  for i in range(k):
    config = _config(model, batch_size, unimodal=True)
    config.optim.lr = 1e-3 * (i + 1)
    config.model.partner_dropout = 0.5 + 0.1 * (i % 4)
    config.loss.unimodal_terms.center = 0.3 * (i + 1)
    configs.append(config)
  return configs


def _timed(fn, steps: int):
  """(seconds of the first call, seconds of ``steps`` more): compile, then throughput."""
  import jax
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = None
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return first, time.perf_counter() - t0


def measure(model: str, k: int, *, steps: int, batch_size: int,
            members: str = "seeds") -> dict:
  """Samples/s (over all members) of K members together and one by one, and compile
  seconds; members are seeds of one config, or configurations (``member_configs``)."""
  import jax

  from dsf3n_jax import input_pipeline
  from dsf3n_jax.training import run as run_lib
  from dsf3n_jax.training import seeds as seeds_lib
  from dsf3n_jax.training import steps as steps_lib

  configs = (member_configs(model, k, batch_size) if members == "configs"
             else [_config(model, batch_size)] * k)
  seeds = list(range(k)) if members == "seeds" else [0] * k
  run = run_lib.prepare_run(configs[0])
  batches = seeds_lib.SeedBatches(run.sources.train, seeds=seeds, global_batch_size=batch_size,
                                  mesh=run.mesh)
  states = seeds_lib.init_states(run, seeds)
  if members == "configs":
    step_fn = steps_lib.per_device_hyper_step(configs[0], run.model,
                                              steps_per_epoch=run.steps_per_epoch)
    together = seeds_lib.make_seeds_step(step_fn, run.mesh, num_stacked=1)
    extra = (seeds_lib.stacked_hyper_params(configs, run.mesh),)
  else:
    together = seeds_lib.make_seeds_step(
        steps_lib.per_device_step(configs[0], run.model, run.tx), run.mesh)
    extra = ()

  def step_together():
    nonlocal states
    states, m = together(states, next(batches), *extra)
    return m

  compile_together, together_s = _timed(step_together, steps)
  batches.close()

  singles, alone, compile_single = [], [], 0.0
  for config, seed in zip(configs, seeds):
    if members == "configs" or not singles:  # one compiled step per configuration
      prepared = run_lib.prepare_run(config) if members == "configs" else run
      singles.append(steps_lib.make_train_step(
          steps_lib.per_device_step(config, prepared.model, prepared.tx), run.mesh))
    alone.append(seeds_lib.seed_state(seeds_lib.init_states(run, [seed]), 0))
  loaders = [input_pipeline.TrainLoader(run.sources.train, global_batch_size=batch_size,
                                        mesh=run.mesh, seed=s) for s in seeds]

  def step_alone(i):
    alone[i], m = singles[min(i, len(singles) - 1)](alone[i], next(loaders[i]))
    return m

  for i in range(len(singles)):  # each compiled program's first call
    first, _ = _timed(lambda i=i: step_alone(i), 0)
    compile_single += first
  t0 = time.perf_counter()
  for _ in range(steps):
    for i in range(k):
      m = step_alone(i)
  jax.block_until_ready(m)
  separate_s = time.perf_counter() - t0
  for loader in loaders:
    loader.close()
  samples = steps * k * batch_size
  return {"model": model, "members": members, "k": k, "steps": steps,
          "batch_size": batch_size,
          "together_samples_per_s": samples / together_s,
          "one_by_one_samples_per_s": samples / separate_s,
          "speedup": separate_s / together_s,
          "compile_s": {"together": compile_together, "single": compile_single,
                        "single_programs": len(singles)}}


def markdown(doc: dict) -> str:
  m, acc = doc["machine"], doc["accelerator"]
  what = "configurations" if doc.get("members") == "configs" else "seeds"
  lines = [f"## K {what} together (one vmapped program) vs one by one", "",
           f"- Machine: {m['cpu_model']}, {m['cores']} cores; JAX backend {acc['jax_backend']} "
           f"({acc['jax_devices']} x {acc['jax_device_kind']}); date {doc['started']}",
           f"- Command: `{doc['command']}`",
           f"- Samples/s over all {what}, compile excluded; batch per member as given; "
           "compile: the first call of each compiled program (one by one: "
           + ("one program per configuration, summed)" if what == "configurations" else
              "one program)"), "",
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
  parser.add_argument("--members", default="seeds", choices=("seeds", "configs"),
                      help="K seeds of one config, or K configurations (a sweep's group)")
  parser.add_argument("--out", default=None)
  raw = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(raw)
  machine = sysinfo.machine_info()  # before the runs: its date is the start
  rows = []
  for model in args.model or list(DEFAULT_MODELS):
    for k in args.k or [1, 2, 4]:
      rows.append(measure(model, k, steps=args.steps, batch_size=args.batch_size,
                          members=args.members))
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  doc = {**sysinfo.report_header("seeds", raw, machine), "members": args.members, "rows": rows}
  tag = sysinfo.machine_slug(machine, doc["accelerator"])
  accuracy.publish(args.out, f"{'sweep' if args.members == 'configs' else 'seeds'}-{tag}",
                   doc, markdown(doc))
  return 0


if __name__ == "__main__":
  sys.exit(main())
