"""Where the time of an on-device (``lax.scan``) epoch goes, op by op.

  python -m benchmarks.scan_profile [--steps 2] [--batch-size 128] [--top 12] [--smoke]

Compiles ``train.make_train_epoch`` for a few steps of synthetic VEGAS-shaped
data, runs it once, traces a second call with ``jax.profiler.trace`` and
prints the ops that took the most thread time (``benchmarks.cases``' trace
reader, as in the ``profile`` job of ``benchmarks.run``). On XLA:CPU this
shows why the scan epoch is much slower per step than the jitted step.
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time

from benchmarks import cases_train, harness, hlo, op_trace


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--top", type=int, default=12)
  parser.add_argument("--smoke", action="store_true", help="the tiny model of --smoke runs")
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from benchmarks import run
  from dsf3n_jax import input_pipeline, train
  bs, n = args.batch_size, args.batch_size * args.steps
  model_overrides = run.SMOKE_MODEL if args.smoke else {}
  cfg, _, model, tx, host_state = harness.jax_setup({"model": model_overrides}, batch_size=bs,
                                                  steps_per_epoch=args.steps)
  mesh, _ = harness.mesh_of("one")
  data = harness.synthetic_batch(n, seed=1)
  state = jax.device_put(host_state, NamedSharding(mesh, P()))
  source = input_pipeline.ArraySource(data["visual"], data["audio"], data["label"])
  compiled, arrays, _, _ = cases_train.compiled_scan_epoch(
      train.per_device_step(cfg, model, tx), cfg, state, source, mesh, batch_size=bs,
      num_examples=n)
  text = compiled.as_text()
  module = re.match(r"HloModule\s+([\w.\-]+)", text).group(1)
  instrs, computations = hlo.parse_hlo(text)
  state, _ = jax.block_until_ready(compiled(state, arrays, jnp.int32(0)))
  t0 = time.perf_counter()
  state, _ = jax.block_until_ready(compiled(state, arrays, jnp.int32(1)))
  wall = time.perf_counter() - t0
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      jax.block_until_ready(compiled(state, arrays, jnp.int32(2)))
    pieces, _ = op_trace.trace_op_times(trace_dir, module)
  per_op: collections.Counter = collections.Counter()
  for op, _, start, end, _ in pieces:
    per_op[op] += (end - start) / 1e9
  total = sum(per_op.values())
  print(f"{jax.default_backend()}: {args.steps} steps of batch {bs} in {wall:.2f} s "
        f"({wall / args.steps:.2f} s per step); traced thread time {total:.2f} s")
  print(f"{'thread s':>9} {'share':>6} {'GFLOP/s/thread':>14}  op (category; shape; layer)")
  for op, seconds in per_op.most_common(args.top):
    info = instrs.get(op, {}) if op else {}
    category, flops = (hlo.classify_hlo(op, instrs, computations) if op in instrs
                       else ("runtime", 0.0))
    # Each op of the loop body runs once per step.
    rate = f"{flops * args.steps / seconds / 1e9:.2f}" if flops and seconds else "-"
    layer = op_trace.layer_of(info.get("op_name", "")) if info else ""
    print(f"{seconds:9.3f} {seconds / total:6.1%} {rate:>14}  {op} ({category}; "
          f"{info.get('shape', '')}; {layer})")


if __name__ == "__main__":
  main()
