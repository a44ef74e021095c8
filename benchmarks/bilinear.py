"""The MFA's bilinear product alone: forward, and forward plus backward, by block size.

``layers.bilinear`` multiplies the inputs' outer product by the kernel over blocks of
``BILINEAR_BLOCK`` rows of the kernel's first axis (``lax.scan``; the kernel's gradient over
blocks of as many rows of its second axis); ``--blocks 0`` is the one unblocked product.
The shapes are the training step's (3 tokens x batch rows, 256 x 256 x 256 kernel) and,
with ``--rows``, any other::

  python -m benchmarks.bilinear                       # rows 384 (batch 128), blocks 0 4 8 16 32
  python -m benchmarks.bilinear --rows 3072 --out DIR # the evaluation's batch of 1,024

Writes ``bilinear-<rows>.json`` (median milliseconds and GFLOP/s of each) to ``--out``
(default ``benchmarks/results``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from benchmarks.harness import repeat

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _median_ms(fn, *args, repeats: int) -> float:
  import jax
  times = repeat(lambda: jax.block_until_ready(fn(*args)), warmup=1, repeats=repeats)
  return float(np.median(times) * 1e3)  # the warm-up compiles


def measure(rows: int, blocks, *, dim: int = 256, repeats: int = 5) -> list[dict]:
  """One row per block size: forward and forward+backward milliseconds and GFLOP/s."""
  import jax
  import jax.numpy as jnp

  from dsf3n_jax.models import layers
  keys = jax.random.split(jax.random.key(0), 4)
  kernel = jax.random.normal(keys[0], (dim, dim, dim))
  x, z = (jax.random.normal(k, (rows, dim)) for k in keys[1:3])
  dy = jax.random.normal(keys[3], (rows, dim))
  flops = 2.0 * rows * dim * dim * dim  # one product; the backward has two
  saved, out = layers.BILINEAR_BLOCK, []
  try:
    for block in blocks:
      layers.BILINEAR_BLOCK = block or None
      # New functions per block: the block is read when the function is traced.
      fwd = jax.jit(lambda x, z, k: layers.bilinear(x, z, k))
      # The value too: with the gradients alone XLA drops the forward product (the gradient
      # of sum(y * dy) does not read y), and the time would be the backward's two products.
      grad = jax.jit(jax.value_and_grad(lambda x, z, k: jnp.sum(layers.bilinear(x, z, k) * dy),
                                        argnums=(0, 1, 2)))
      f_ms = _median_ms(fwd, x, z, kernel, repeats=repeats)
      fb_ms = _median_ms(grad, x, z, kernel, repeats=repeats)
      out.append({"block": block, "forward_ms": f_ms, "forward_gflops": flops / f_ms / 1e6,
                  "forward_backward_ms": fb_ms,
                  "forward_backward_gflops": 3 * flops / fb_ms / 1e6})
  finally:
    layers.BILINEAR_BLOCK = saved
  return out


def main(argv=None) -> pathlib.Path:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.bilinear", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=384, help="rows of each input (3 x batch)")
  parser.add_argument("--blocks", type=int, nargs="+", default=[0, 4, 8, 16, 32],
                      help="block sizes (0: one unblocked product)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args(argv)
  import jax
  rows = measure(args.rows, args.blocks, repeats=args.repeats)
  print("| block | forward ms | GFLOP/s | forward+backward ms | GFLOP/s |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['block'] or 'one product'} | {r['forward_ms']:.1f} | {r['forward_gflops']:.0f}"
          f" | {r['forward_backward_ms']:.1f} | {r['forward_backward_gflops']:.0f} |")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"bilinear-{args.rows}.json"
  from benchmarks import sysinfo
  from dsf3n_jax.paths import atomic_write
  atomic_write(path, json.dumps({"rows": args.rows, "device": jax.devices()[0].device_kind,
                                 "machine": sysinfo.machine_info(), "results": rows},
                                indent=2) + "\n")
  print(f"wrote {path}")
  return path


if __name__ == "__main__":
  main()
