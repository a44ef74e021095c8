"""A checkpoint's restore: read once into host memory and placed, against orbax reading it
once per device.

  python -m benchmarks.restore_time                       # tiny and full model, 8 CPU devices
  python -m benchmarks.restore_time --configs=tiny --devices=4 --rounds=5 --out=DIR

A run's state is replicated over its mesh. Restored by orbax into a replicated target
(``ocp.checkpoint_utils.construct_restore_args``), each array is read for every device it
goes to; ``Checkpointer.restore`` reads each into a host array once and places the whole
state in one ``device_put`` (per process across processes), and the command-line tools keep
it on the host (``restore_model``). For each model (``configs/synthetic.py``: ``tiny`` is
``:runlocal,tiny``, ``full`` its default model), the initial state is saved once, then each
round times, in turn:

* ``per_device``: orbax's replicated restore, what ``Checkpointer.restore`` did before;
* ``placed``: ``Checkpointer.restore`` into the same target (what a resume does);
* ``host``: ``Checkpointer.restore`` into a target without shardings (the tools').

It checks that the three give the same arrays, bit for bit, and the placed ones the target's
sharding. ``--devices`` sets the host CPU device count (unless ``XLA_FLAGS`` sets it; on
GPU/TPU: the devices there are).
Writes ``restore-time-<machine>.json`` and ``.md`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

from benchmarks import accuracy, sysinfo

CONFIGS = {"tiny": "runlocal,tiny", "full": "runlocal"}
KINDS = ("per_device", "placed", "host")


def measure(names: Sequence[str], rounds: int) -> list[dict]:
  return [_row(name, rounds) for name in names]


def _row(name: str, rounds: int) -> dict:
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  from configs import synthetic
  from dsf3n_jax import checkpoints
  from dsf3n_jax.training import run as run_lib
  from dsf3n_jax.training import state as state_lib

  config = synthetic.get_config(CONFIGS[name])
  run = run_lib.prepare_run(config)
  kwargs = dict(num_classes=run.sources.num_classes, loss_terms=config.loss.terms)
  state = state_lib.make_init_fn(run.model, run.tx, **kwargs)(config.seed)
  abstract = state_lib.abstract_state(run.model, run.tx, **kwargs)
  target = checkpoints.abstract_like(abstract, run.mesh)
  times = {kind: [] for kind in KINDS}
  with tempfile.TemporaryDirectory() as tmp:
    checkpointer = checkpoints.Checkpointer(tmp, keep=1)
    checkpointer.save(1, state, state_lib.new_meta())
    checkpointer.wait()

    def per_device():
      return checkpointer.manager.restore(1, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(target, restore_args=(
              ocp.checkpoint_utils.construct_restore_args(target)))))["state"]

    ways = {"per_device": per_device,
            "placed": lambda: checkpointer.restore(target, step=1)[0],
            "host": lambda: checkpointer.restore(abstract, step=1)[0]}
    for _ in range(rounds):
      got = {}
      for kind in KINDS:
        t0 = time.perf_counter()
        got[kind] = jax.block_until_ready(ways[kind]())
        times[kind].append(time.perf_counter() - t0)
      leaves = {kind: jax.tree.leaves(tree) for kind, tree in got.items()}
      for kind in ("placed", "host"):
        for a, b in zip(leaves["per_device"], leaves[kind], strict=True):
          if np.asarray(a).tobytes() != np.asarray(b).tobytes():
            raise AssertionError(f"{name}: the {kind} restore read other values")
      if any(x.sharding != t.sharding for x, t in zip(leaves["placed"],
                                                       jax.tree.leaves(target))):
        raise AssertionError(f"{name}: the placed restore is not on the target's sharding")
    checkpointer.close()
  leaves = jax.tree.leaves(state)
  return {"model": name, "config": f"configs/synthetic.py:{CONFIGS[name]}",
          "arrays": len(leaves), "bytes": int(sum(x.nbytes for x in leaves)),
          "devices": run.mesh.size, "rounds": rounds,
          **{kind: {"median": statistics.median(t), "min": min(t), "max": max(t)}
             for kind, t in times.items()}}


def markdown(doc: dict) -> str:
  lines = [f"# A checkpoint's restore ({doc['machine']['cpu_model']}, {doc['started']})", "",
           f"`{doc['command']}`; {doc['accelerator']['jax_backend']}. Seconds, medians of the "
           "rounds (min-max), timed in turn; the three ways read the same arrays, bit for bit.",
           "", "| model | arrays | MB | devices | per device (orbax) | read once, placed | "
           "on the host | per device / placed |", "|---|---|---|---|---|---|---|---|"]

  def cell(t):
    return f"{t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f})"

  for r in doc["rows"]:
    lines.append(f"| {r['model']} | {r['arrays']} | {r['bytes'] / 1e6:.1f} | {r['devices']} | "
                 f"{cell(r['per_device'])} | {cell(r['placed'])} | {cell(r['host'])} | "
                 f"{r['per_device']['median'] / r['placed']['median']:.2f}x |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.restore_time", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default="tiny,full",
                      help=f"comma-separated, of {', '.join(CONFIGS)}")
  parser.add_argument("--devices", type=int, default=8, help="host CPU devices (CPU only)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=None)
  raw = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(raw)
  names = [n for n in args.configs.split(",") if n]
  unknown = [n for n in names if n not in CONFIGS]
  if unknown or not names:
    parser.error(f"--configs={args.configs}: expected names among {', '.join(CONFIGS)}")
  if args.rounds < 1 or args.devices < 1:
    parser.error(f"--rounds={args.rounds}, --devices={args.devices}: expected at least 1")
  import os

  import jax
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", args.devices)  # before the backend starts
  machine = sysinfo.machine_info()  # before the runs: its date is the start
  doc = {**sysinfo.report_header("restore_time", raw, machine),
         "rows": measure(names, args.rounds)}
  name = "restore-time-" + sysinfo.machine_slug(machine, doc["accelerator"])
  accuracy.publish(args.out, name, doc, markdown(doc))
  return 0


if __name__ == "__main__":
  sys.exit(main())
