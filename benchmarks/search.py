"""Library search: the exact kernel (``dsf3n_jax.knn``) against numpy, and index building.

  python -m benchmarks.search            # 10k, 100k and 1M items (a few minutes on 2 cores)
  python -m benchmarks.search --quick    # 10k and 100k
  python -m benchmarks.search --out DIR  # default benchmarks/results/

Rows, at each library size (64-d float32 Gaussian embeddings, 1,024 queries,
k = 10, cosine, all in one process):

* ``exact``: ``knn.Library.search`` (library on every device of this host),
  compiled first; seconds, queries/s, GFLOP/s of its matrix products
  (2 n m d), and that rate as a fraction of the roofline: the same matrix
  product alone (``jnp.dot`` of the queries with one block, no top-k);
* ``approximate``: ``jax.lax.approx_max_k`` per block (exact on CPU), with
  recall@k against the exact ids;
* ``numpy``: normalised dot + ``argpartition`` + a sort of the k (the plain
  way), and the exact kernel's speed-up over it;
* ``faiss``: ``IndexFlatIP`` on normalised rows, when faiss is installed.

Besides: index building from embeddings (``index.build``: items/s written),
the tiny model's embedding rate (items/s), and the process's peak memory.
Results: ``search-<machine>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import sysinfo
from dsf3n_jax import index as index_lib
from dsf3n_jax import knn

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DIM, QUERIES, K = 64, 1024, 10


def _time(fn, repeat: int = 3) -> float:
  fn()  # compile / warm
  best = float("inf")
  for _ in range(repeat):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _numpy_search(queries, unit_items, k):
  """numpy's top-k by cosine of a library normalised once beforehand (as ``Library.put``
  normalises it once): per call, the queries' norms, the product and the top-k."""
  scores = _unit(queries) @ unit_items.T
  part = np.argpartition(-scores, k, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
  return np.take_along_axis(part, order, 1)


def _dot_roofline(queries, block: int, repeat: int = 5) -> float:
  """GFLOP/s of the kernel's matrix product alone (queries x one block of the library)."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(block, queries.shape[1])), jnp.float32)
  q = jnp.asarray(queries)
  dot = jax.jit(lambda q, x: jnp.dot(q, x.T, precision=jax.lax.Precision.HIGHEST))
  seconds = _time(lambda: dot(q, x).block_until_ready(), repeat)
  return 2 * q.shape[0] * block * q.shape[1] / seconds / 1e9


def _faiss_search(queries, items, k):
  import faiss  # pylint: disable=g-import-not-at-top
  index = faiss.IndexFlatIP(items.shape[1])
  index.add(items / np.linalg.norm(items, axis=1, keepdims=True))
  return index.search(queries / np.linalg.norm(queries, axis=1, keepdims=True), k)[1]


def search_rows(sizes, *, block: int = 16384) -> list[dict]:
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(QUERIES, DIM)).astype(np.float32)
  roofline = _dot_roofline(queries, block)
  rows = []
  for m in sizes:
    items = rng.normal(size=(m, DIM)).astype(np.float32)
    library = knn.Library.put(items, block=block)
    flops = 2 * QUERIES * m * DIM
    exact_ids = library.search(queries, K)[0]
    seconds = _time(lambda lib=library: lib.search(queries, K))
    gflops = flops / seconds / 1e9
    approx_s = _time(lambda lib=library: lib.search(queries, K, approximate=True))
    approx_ids = library.search(queries, K, approximate=True)[0]
    recall = float(np.mean([len(set(a) & set(e)) / K for a, e in zip(approx_ids, exact_ids)]))
    unit_items = _unit(items)
    numpy_s = _time(lambda x=unit_items: _numpy_search(queries, x, K), repeat=1)
    numpy_ids = _numpy_search(queries, unit_items, K)
    row = {"items": m, "dim": DIM, "queries": QUERIES, "k": K, "block": library.block,
           "exact_s": seconds, "queries_per_s": QUERIES / seconds, "gflops": gflops,
           "dot_roofline_gflops": roofline, "roofline_fraction": gflops / roofline,
           "approximate_s": approx_s, "approximate_recall_at_k": recall,
           "numpy_s": numpy_s, "speedup_over_numpy": numpy_s / seconds,
           "ids_equal_numpy_fraction": float(np.mean(numpy_ids == exact_ids))}
    try:
      row["faiss_flat_s"] = _time(lambda x=items: _faiss_search(queries, x, K), repeat=1)
    except ImportError:
      row["faiss_flat_s"] = None  # not installed
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def build_rows(size: int) -> dict:
  """Index building from embeddings (write rate) and the tiny model's embedding rate."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from dsf3n_jax import train  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  emb = rng.normal(size=(size, DIM)).astype(np.float32)
  with tempfile.TemporaryDirectory() as tmp:
    library = index_lib.Library(emb, np.arange(size), None, {"benchmark": size}, "benchmark")
    t0 = time.perf_counter()
    index_lib.build(pathlib.Path(tmp) / "i", library, modality="visual", embed=None,
                    input_dim=None, fingerprint=None, protocol="given")
    write_s = time.perf_counter() - t0
    memory = _index_memory(pathlib.Path(tmp) / "i")
  config = default.get_config("tiny")
  mcfg = train.model_config(config, num_classes=10, visual_dim=1024, audio_dim=128)
  model = train.build_model(mcfg, axis_name=None)
  variables = model.init(jax.random.key(0), jnp.zeros((2, 1024)), jnp.zeros((2, 128)))
  run = index_lib.RunModel("benchmark", model, variables, config, mcfg, "benchmark")
  embed = run.embedder("visual")
  features = rng.normal(size=(16384, 1024)).astype(np.float32)
  embed_s = _time(lambda: embed(features), repeat=2)
  return {"build_items": size, "build_from_embeddings_items_per_s": size / write_s,
          "tiny_model_embed_items_per_s": len(features) / embed_s,
          "library_mib": emb.nbytes / 2**20, **memory}


_MEMORY_CHILD = """
import json, sys
import numpy as np
from dsf3n_jax import search
def status():
  try:
    lines = open("/proc/self/status").read().splitlines()
  except OSError:
    return {}
  return {k: int(v.split()[0]) / 1024 for k, v in (l.split(":", 1) for l in lines)
          if k in ("VmHWM", "RssAnon", "RssFile")}
before = status()
index = search.Index.load(sys.argv[1])
n, d, k = (int(a) for a in sys.argv[2:5])
index.search(np.random.default_rng(3).normal(size=(n, d)).astype(np.float32), k)
after = status()
print(json.dumps({"search_peak_rss_mib": after.get("VmHWM"),
                  "search_rss_before_mib": before.get("VmHWM"),
                  "search_anon_after_mib": after.get("RssAnon"),
                  "search_file_after_mib": after.get("RssFile")}))
"""


def _index_memory(path: pathlib.Path) -> dict:
  """A fresh process loads the index at ``path`` and searches it: its peak resident memory,
  and after the search its anonymous memory and its file pages (the memory-mapped shards,
  which the kernel can drop), in MiB, from ``/proc/self/status`` (None elsewhere than Linux;
  ``ru_maxrss`` would carry the parent's peak over ``exec``)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(path), str(QUERIES), str(DIM),
                        str(K)], check=True,
                       capture_output=True, text=True,
                       cwd=pathlib.Path(__file__).resolve().parents[1]).stdout
  return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.search", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="10k and 100k items only")
  parser.add_argument("--out", default=str(RESULTS), help="output folder")
  parser.add_argument("--sizes", help="library sizes, e.g. 2000,5000 (instead of the modes')")
  args = parser.parse_args(argv)
  sizes = (10_000, 100_000) if args.quick else (10_000, 100_000, 1_000_000)
  if args.sizes:
    sizes = tuple(int(s) for s in args.sizes.split(","))
  machine, accelerator = sysinfo.machine_info(), sysinfo.accelerator_info()
  command = "python -m benchmarks.search" + (" --quick" if args.quick else "") + (
      f" --sizes={args.sizes}" if args.sizes else "")
  doc = {"benchmark": "search", "command": command, "machine": machine,
         "accelerator": accelerator,
         "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
         "rows": search_rows(sizes), "build": build_rows(max(sizes))}
  doc["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = f"search-{sysinfo.machine_slug(machine, accelerator)}"
  (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
  (out / f"{stem}.md").write_text(markdown(doc))
  print(markdown(doc))
  return 0


def markdown(doc) -> str:
  lines = [f"# Library search ({doc['devices']})", "", f"`{doc['command']}`: {DIM}-d, "
           f"{QUERIES} queries, k = {K}, cosine; best of 3 (numpy and faiss: 1 run).", "",
           "| items | exact s | queries/s | GFLOP/s | of the dot's roofline | approx s | "
           "approx recall@k | numpy s | exact vs numpy | faiss flat s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in doc["rows"]:
    faiss = f"{r['faiss_flat_s']:.3f}" if r["faiss_flat_s"] is not None else "not installed"
    lines.append(
        f"| {r['items']:,} | {r['exact_s']:.3f} | {r['queries_per_s']:,.0f} | {r['gflops']:.0f} "
        f"| {r['roofline_fraction']:.0%} of {r['dot_roofline_gflops']:.0f} | "
        f"{r['approximate_s']:.3f} | {r['approximate_recall_at_k']:.3f} | {r['numpy_s']:.3f} | "
        f"{r['speedup_over_numpy']:.1f}x | {faiss} |")
  b = doc["build"]
  lines += ["", f"Index build from {b['build_items']:,} embeddings: "
            f"{b['build_from_embeddings_items_per_s']:,.0f} items/s; the tiny model embeds "
            f"{b['tiny_model_embed_items_per_s']:,.0f} items/s. Peak memory "
            f"{doc['peak_rss_mib']:,.0f} MiB."]
  if b.get("search_peak_rss_mib") is not None:
    lines += ["", f"That index ({b['library_mib']:,.0f} MiB of embeddings) loaded and searched "
              f"({QUERIES:,} queries) in a fresh process: peak resident "
              f"{b['search_peak_rss_mib']:,.0f} MiB ({b['search_rss_before_mib']:,.0f} before "
              f"the load); after the search {b['search_anon_after_mib']:,.0f} MiB anonymous and "
              f"{b['search_file_after_mib']:,.0f} MiB of file pages (the memory-mapped shards)."]
  lines.append("")
  return "\n".join(lines)


if __name__ == "__main__":
  raise SystemExit(main())
