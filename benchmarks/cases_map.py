"""Cases of the embedding forward and the mAP kernel against the original's loop."""

from __future__ import annotations

import functools
import inspect
import statistics
import time
from collections.abc import Mapping
from typing import Any

from benchmarks import original_map
from benchmarks.cases_torch import call_blocking, torch_model, torch_sync
from benchmarks.harness import (
  host_peak_bytes,
  jax_setup,
  mesh_of,
  rates,
  repeat,
  stats,
  synthetic_batch,
)


def case_embed(params: Mapping[str, Any]) -> dict[str, Any]:
  """Eval-mode forward (the four outputs) of one batch: JAX float32 and bf16, PyTorch eager."""
  import jax
  import torch
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from dsf3n_jax import train
  batch_size = int(params["batch_size"])
  batch = synthetic_batch(batch_size)
  out: dict[str, Any] = {"batch_size": batch_size}
  for dtype in ("float32", "bfloat16"):
    _, mcfg, _, _, state = jax_setup(params, batch_size=batch_size, dtype=dtype)
    mesh, _ = mesh_of("one")
    if "mesh" in inspect.signature(train.make_embed_fn).parameters:
      embed = train.make_embed_fn(train.build_model(mcfg), mesh, unimodal=False)
    else:
      embed = train.make_embed_fn(train.build_model(mcfg, axis_name=None))
    variables = jax.device_put({"params": state.params, "batch_stats": state.batch_stats},
                               NamedSharding(mesh, P()))
    visual, audio = (jax.device_put(batch[k], NamedSharding(mesh, P("data")))
                     for k in ("visual", "audio"))
    t0 = time.perf_counter()
    jax.block_until_ready(embed(variables, visual, audio))
    first = time.perf_counter() - t0
    times = repeat(functools.partial(call_blocking, embed, variables, visual, audio),
                   warmup=params["warmup"], repeats=params["repeats"])
    out[f"jax_{dtype}"] = {"samples_per_s": rates(batch_size, times), "first_call_s": first}
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  tb = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
  for einsum in (False, True):
    model, _ = torch_model(params, einsum=einsum, device=device)
    model.eval()

    def run(model=model):
      with torch.no_grad():
        model(tb["visual"], tb["audio"])
      torch_sync(device)

    times = repeat(run, warmup=params["warmup"], repeats=params["repeats"],
                   budget_s=params.get("budget_s", float("inf")))
    out["torch_einsum" if einsum else "torch_bilinear"] = {
        "samples_per_s": rates(batch_size, times)}
  out["host_peak_bytes"] = host_peak_bytes()
  return out


def case_map_compare(params: Mapping[str, Any]) -> dict[str, Any]:
  """mAP (audio -> visual, all items ranked) on the same embeddings: ours (the default and
  each strategy), the original loop, numpy and scikit-learn.

  The original loop runs at ``params["original_n"]`` (the others at ``n``
  too when it differs, so each speed-up compares equal sizes).
  """
  from dsf3n_jax import metrics

  out: dict[str, Any] = {}
  sizes = sorted({int(params["n"]), int(params["original_n"])})
  for n in sizes:
    visual, audio, labels = original_map.synthetic_embeddings(n)
    row: dict[str, Any] = {"n": n}
    impls = {
        "ours": functools.partial(metrics.mean_average_precision, audio, visual, labels,
                                  labels, distance="cosine"),
        # Both exact strategies, whichever the default is on this backend.
        **{f"ours_{s}": functools.partial(metrics.mean_average_precision, audio, visual, labels,
                                          labels, distance="cosine", strategy=s)
           for s in ("sort", "count")},
        "numpy": functools.partial(original_map.numpy_map, audio, visual, labels, labels),
        "sklearn": functools.partial(original_map.sklearn_map, audio, visual, labels, labels),
    }
    if n == int(params["original_n"]):
      impls["original"] = functools.partial(original_map.fx_calc_map_label, audio, visual,
                                            labels)
    for name, fn in impls.items():
      value = {}
      t0 = time.perf_counter()
      value["map"] = fn()
      first = time.perf_counter() - t0
      if name == "original":
        warmup, repeats = 0, int(params["original_repeats"]) - 1
        times = [first] + repeat(fn, warmup=0, repeats=repeats) if repeats else [first]
      else:
        warmup, repeats = 0, int(params["repeats"])
        times = repeat(fn, warmup=warmup, repeats=repeats, budget_s=params.get("budget_s", 60))
      row[name] = {"seconds": stats(times), "first_call_s": first, "map": value["map"]}
    maps = [row[k]["map"] for k in impls]
    row["max_abs_difference"] = float(max(maps) - min(maps))
    out[str(n)] = row
  out["host_peak_bytes"] = host_peak_bytes()
  return out


def case_map_scaling(params: Mapping[str, Any]) -> dict[str, Any]:
  """Our mAP kernel on ``queries`` x ``items``; the time for all ``items`` queries is extrapolated.

  Query blocks are independent, so the time is linear in the number of
  queries; the figure for a square problem is ``seconds * items / queries``.
  """
  from dsf3n_jax import metrics

  items_n, queries_n, k = int(params["items"]), int(params["queries"]), int(params["k"])
  visual, audio, labels = original_map.synthetic_embeddings(items_n)
  q, ql = audio[:queries_n], labels[:queries_n]
  fn = lambda: metrics.mean_average_precision(q, visual, ql, labels, distance="cosine",
                                              k=k or None)
  t0 = time.perf_counter()
  value = fn()
  first = time.perf_counter() - t0
  times = repeat(fn, warmup=0, repeats=params["repeats"], budget_s=params.get("budget_s", 60))
  return {"items": items_n, "queries": queries_n, "k": k, "map": value, "first_call_s": first,
          "seconds": stats(times),
          "square_seconds_extrapolated": statistics.median(times) * items_n / queries_n,
          "host_peak_bytes": host_peak_bytes()}


