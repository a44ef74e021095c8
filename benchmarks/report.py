"""Turns the raw job results of ``benchmarks.run`` into sections, ratios, targets and Markdown.

``sections(document)`` is machine-readable (it goes into the JSON file);
``benchmarks.report_md.markdown(document)`` renders it. A failed job shows up as a row with its
error, never as a missing row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SECTIONS = ("machine", "matmul_peak", "train_step", "flops", "compile", "memory", "embed",
            "epoch", "profile", "map", "map_scaling", "allocators", "ratios", "targets")
RECIPE_EPOCHS = 40
EPOCH_NAMES = {"scan": "JAX on-device epoch (lax.scan), 1 device",
               "streaming": "JAX streamed epoch (TrainLoader + jitted step), 1 device"}
PROFILE_TOP = 15
# The performance targets (batch 128, float32 unless named): a measured value at least the
# threshold, or at most it for the keys of AT_MOST (the evaluations' cost).
TARGETS = {"jax_samples_per_s": 180.0, "fraction_of_matmul_peak": 0.75,
           "fraction_of_matmul_peak_interleaved": 0.75,
           "speedup_vs_original": 25.0, "speedup_vs_best_pytorch": 1.4,
           "map_speedup_vs_original": 100.0, "bfloat16_over_float32": 1.0,
           "selection_evaluation_over_paired_pass": 1.1,
           "unimodal_evaluation_over_paired_pass": 1.8}
AT_MOST = frozenset({"selection_evaluation_over_paired_pass",
                     "unimodal_evaluation_over_paired_pass"})


def _median(x: Mapping[str, Any] | None) -> float | None:
  return None if not x else x.get("median")


def _mib(x) -> float | None:
  return None if x is None else x / 2**20


def _train_rows(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
  jobs = doc["jobs"]
  rows = []
  labels = {
      ("jax_train", "float32", "one"): "JAX jit, 1 device",
      ("jax_train", "bfloat16", "one"): "JAX jit, 1 device, bf16 compute",
      ("jax_train", "unimodal_recipe", "one"): "JAX jit, 1 device, the :unimodal recipe's step",
      ("jax_train", "float32", "all"): "JAX data-parallel, all local devices",
      ("torch_train", "bilinear", "eager"): "PyTorch eager, nn.Bilinear (original code path)",
      ("torch_train", "einsum", "eager"): "PyTorch eager, einsum bilinear",
      ("torch_train", "bilinear", "compile"): "PyTorch torch.compile, nn.Bilinear",
      ("torch_train", "einsum", "compile"): "PyTorch torch.compile, einsum bilinear",
  }
  for job_id, r in jobs.items():
    parts = job_id.split("/")
    if parts[0] not in ("jax_train", "torch_train") or len(parts) != 4:
      continue
    name = labels[tuple(parts[:3])]
    if parts[2] == "all" and "devices" in r:
      forced = r.get("xla_force_host_platform_device_count")
      name = (f"JAX data-parallel, {r['devices']} devices"
              + (" (one CPU split into forced host devices)" if forced else ""))
    rows.append({"id": job_id, "name": name, "framework": parts[0].split("_")[0],
                 "batch": int(parts[3]),
                 "dtype": r.get("dtype", "float32"),
                 "flops_per_sample": r.get("flops_per_sample"),
                 "samples_per_s": r.get("samples_per_s"),
                 "compile_s": r.get("compile_s", r.get("first_call_s")),
                 "host_peak_mib": _mib(r.get("host_peak_bytes")),
                 "device_peak_mib": _mib(r.get("device_peak_bytes")),
                 "minor_faults_per_step": r.get("minor_faults_per_step"),
                 "interleaved_peak": r.get("interleaved_peak"),
                 "error": r.get("error")})
  for job_id, epoch in _epoch_jobs(doc):
    rows.append({"id": job_id, "name": _epoch_name(job_id, epoch),
                 "framework": "jax", "batch": epoch.get("batch_size"), "dtype": "float32",
                 "samples_per_s": epoch.get("samples_per_s"),
                 "compile_s": epoch.get("compile_s"),
                 "host_peak_mib": _mib(epoch.get("host_peak_bytes")),
                 "device_peak_mib": _mib(epoch.get("device_peak_bytes")),
                 "minor_faults_per_step": None, "error": epoch.get("error")})
  order = [v for v in labels.values()]
  rows.sort(key=lambda r: (r["batch"] or 0, next((i for i, v in enumerate(order)
                                                   if r["name"].startswith(v[:20])), 99)))
  return rows


def _flops(doc, rows) -> dict[str, Any]:
  jobs = doc["jobs"]
  ref = next((r for k, r in jobs.items() if k.startswith("jax_train/float32/one/")
              and r.get("flops_per_sample")), None)
  peak = jobs.get("matmul_peak", {})
  out = {"flops_per_sample": ref.get("flops_per_sample") if ref else None,
         "from": "XLA cost analysis of the float32 single-device training step",
         "peak_float32_gflops": peak.get("peak_float32_gflops"),
         "peak_bfloat16_gflops": peak.get("peak_bfloat16_gflops"), "rows": []}
  for r in rows:
    rate = _median(r["samples_per_s"])
    flops = r.get("flops_per_sample") or out["flops_per_sample"]  # PyTorch: the same model's
    if rate is None or flops is None:
      continue
    gflops = rate * flops / 1e9
    peak_key = "peak_bfloat16_gflops" if r["dtype"] == "bfloat16" else "peak_float32_gflops"
    r["achieved_gflops"] = gflops
    r["fraction_of_peak"] = gflops / out[peak_key] if out[peak_key] else None
    # The same step and products timed in turn in the row's own process (cases_train).
    r["fraction_of_peak_interleaved"] = _median((r.get("interleaved_peak") or {}).get(
        "fraction_of_peak"))
    out["rows"].append({"id": r["id"], "achieved_gflops": gflops,
                        "fraction_of_peak": r["fraction_of_peak"],
                        "fraction_of_peak_interleaved": r["fraction_of_peak_interleaved"],
                        "peak": peak_key})
  return out


def _ratios(rows) -> list[dict[str, Any]]:
  out = []
  for batch in sorted({r["batch"] for r in rows if r["batch"]}):
    jax_row = next((r for r in rows if r["batch"] == batch and r["id"].startswith(
        "jax_train/float32/one/")), None)
    if not jax_row or _median(jax_row["samples_per_s"]) is None:
      continue
    for r in rows:
      if r["batch"] == batch and r["framework"] == "torch" and _median(r["samples_per_s"]):
        out.append({"batch": batch, "jax": jax_row["name"], "pytorch": r["name"],
                    "ratio": _median(jax_row["samples_per_s"]) / _median(r["samples_per_s"])})
  return out


def _map_rows(doc) -> list[dict[str, Any]]:
  comp = doc["jobs"].get("map_compare", {})
  rows = []
  if "error" in comp:
    return [{"implementation": "all", "error": comp["error"]}]
  names = {"ours": "dsf3n_jax.metrics (JAX), default strategy",
           "ours_sort": "dsf3n_jax.metrics (JAX), strategy=\"sort\"",
           "ours_count": "dsf3n_jax.metrics (JAX), strategy=\"count\"",
           "original": "original loop (fx_calc_map_label)",
           "numpy": "numpy, vectorised", "sklearn": "scikit-learn (LRAP)"}
  for row in comp.values():
    if not isinstance(row, dict) or "n" not in row:
      continue
    orig = _median(row.get("original", {}).get("seconds"))
    for key, label in names.items():
      if key not in row:
        continue
      sec = _median(row[key]["seconds"])
      rows.append({"implementation": label, "key": key, "n": row["n"],
                   "seconds": row[key]["seconds"], "first_call_s": row[key]["first_call_s"],
                   "map": row[key]["map"],
                   "speedup_vs_original": orig / sec if orig and sec else None})
  return rows


def _scaling_rows(doc) -> list[dict[str, Any]]:
  rows = []
  for job_id, r in doc["jobs"].items():
    if job_id.startswith("map_scaling/"):
      _, items, queries, k = job_id.split("/")
      rows.append({"items": int(items), "queries": int(queries), "k": int(k),
                   "seconds": r.get("seconds"),
                   "square_seconds_extrapolated": r.get("square_seconds_extrapolated"),
                   "error": r.get("error")})
  return rows


def _epoch_jobs(doc) -> list[tuple[str, Mapping[str, Any]]]:
  return [(k, r) for k, r in doc["jobs"].items() if k == "epoch" or k.startswith("epoch/")]


def _epoch_name(job_id: str, e: Mapping[str, Any]) -> str:
  if "mode" in e:
    return EPOCH_NAMES[e["mode"]]
  return f"JAX epoch ({job_id})"


def _epoch(doc, rows) -> dict[str, Any]:
  """One row per epoch job, and PyTorch's recipe from its step rate at the same batch."""
  out: dict[str, Any] = {"rows": [], "pytorch_recipe_s_extrapolated": {},
                         "recipe_epochs": RECIPE_EPOCHS}
  for job_id, e in _epoch_jobs(doc):
    row: dict[str, Any] = {"id": job_id, "name": _epoch_name(job_id, e), "error": e.get("error")}
    if "error" not in e:
      ev = e.get("evaluation") or {}
      row.update(mode=e["mode"], num_examples=e["num_examples"], batch=e["batch_size"],
                 steps=e["steps"], epoch_s=e["epoch_s"], samples_per_s=e["samples_per_s"],
                 compile_s=e["compile_s"], loader_epoch_s=e.get("loader_epoch_s"),
                 device_put_s=e.get("device_put_s"), evaluation_s=ev.get("evaluate_s"),
                 evaluation_first_call_s=ev.get("first_call_s"), embed_s=ev.get("embed_s"),
                 evaluation_examples=ev.get("examples"), evaluation_error=ev.get("error"),
                 evaluation_protocols=ev.get("protocols"),
                 recipe=e["recipe"])
      out["recipe_epochs"] = e["recipe"]["epochs"]
    out["rows"].append(row)
  done = [r for r in out["rows"] if not r["error"]]
  if done:
    recipe = done[0]["recipe"]
    samples = recipe["epochs"] * recipe["steps_per_epoch"] * done[0]["batch"]
    out["pytorch_recipe_s_extrapolated"] = {
        r["name"]: samples / _median(r["samples_per_s"]) for r in rows
        if r["framework"] == "torch" and r["batch"] == done[0]["batch"]
        and _median(r["samples_per_s"])}
  return out


def _profile(doc) -> dict[str, Any]:
  p = doc["jobs"].get("profile")
  if not p or "error" in p:
    return {"error": (p or {}).get("error", "not run")}
  return {k: v for k, v in p.items() if not k.startswith("load_average")}


def _allocators(doc) -> list[dict[str, Any]]:
  jobs = doc["jobs"]
  out = []
  for job_id, r in jobs.items():
    if job_id.startswith("allocator/") or job_id.startswith("jax_train/float32/one/"):
      batch = int(job_id.rsplit("/", 1)[1])
      if job_id.startswith("jax_train") and not any(
          k.startswith("allocator/") and k.endswith(f"/{batch}") for k in jobs):
        continue
      out.append({"allocator": r.get("allocator", r.get("allocator_requested")),
                  "batch": batch, "samples_per_s": r.get("samples_per_s"),
                  "minor_faults_per_step": r.get("minor_faults_per_step"),
                  "page_mib_per_step": _mib(r.get("page_bytes_per_step")),
                  "error": r.get("error")})
  return out


def _targets(doc, rows, flops, map_rows, epoch) -> list[dict[str, Any]]:
  def row(id_prefix, batch=128):
    return next((r for r in rows if r["id"].startswith(id_prefix) and r["batch"] == batch), None)

  jax_row = row("jax_train/float32/one/")
  jax_rate = _median(jax_row["samples_per_s"]) if jax_row else None
  bf16_row = row("jax_train/bfloat16/one/")
  bf16_rate = _median(bf16_row["samples_per_s"]) if bf16_row else None
  protocols = next((r["evaluation_protocols"] for r in epoch["rows"]
                    if r.get("evaluation_protocols")), None) or {}
  orig = row("torch_train/bilinear/eager/")
  torch_rates = [_median(r["samples_per_s"]) for r in rows
                 if r["framework"] == "torch" and r["batch"] == 128 and _median(r["samples_per_s"])]
  best_torch = max(torch_rates) if torch_rates else None
  ours_map = next((r for r in map_rows if r.get("key") == "ours" and r.get("speedup_vs_original")),
                  None)
  measured = {
      "jax_samples_per_s": jax_rate,
      "fraction_of_matmul_peak": jax_row.get("fraction_of_peak") if jax_row else None,
      "fraction_of_matmul_peak_interleaved": (jax_row.get("fraction_of_peak_interleaved")
                                              if jax_row else None),
      "speedup_vs_original": (jax_rate / _median(orig["samples_per_s"])
                              if jax_rate and orig and _median(orig["samples_per_s"]) else None),
      "speedup_vs_best_pytorch": jax_rate / best_torch if jax_rate and best_torch else None,
      "map_speedup_vs_original": ours_map["speedup_vs_original"] if ours_map else None,
      "bfloat16_over_float32": bf16_rate / jax_rate if bf16_rate and jax_rate else None,
      **{key: protocols.get(key) for key in AT_MOST},
  }
  text = {
      "jax_samples_per_s": "JAX float32 training, batch 128, samples/s",
      "fraction_of_matmul_peak": "achieved FLOP/s / measured float32 matmul peak",
      "fraction_of_matmul_peak_interleaved": ("the same, the step and the peak's products "
                                              "timed in turn in one process (median of rounds)"),
      "speedup_vs_original": "JAX / PyTorch eager nn.Bilinear (original), batch 128",
      "speedup_vs_best_pytorch": "JAX / best PyTorch variant, batch 128",
      "map_speedup_vs_original": (f"mAP: ours / original loop at "
                                  f"{ours_map['n'] if ours_map else '?'}^2"),
      "bfloat16_over_float32": "JAX bf16 compute / float32 training, batch 128, samples/s",
      "selection_evaluation_over_paired_pass": (
          "an intermediate evaluation of the paper's recipe (paired) / one paired embedding "
          "pass (median of rounds)"),
      "unimodal_evaluation_over_paired_pass": (
          "an intermediate evaluation of the :unimodal recipe / one paired embedding pass "
          "(median of rounds)"),
  }
  out = []
  for key, threshold in TARGETS.items():
    value, at_most = measured[key], key in AT_MOST
    met = None if value is None else (value <= threshold if at_most else value >= threshold)
    out.append({"target": key, "description": text[key], "threshold": threshold,
                "direction": "at most" if at_most else "at least", "measured": value,
                "met": met,
                "shortfall_percent": (None if value is None or met
                                      else 100.0 * (value / threshold - 1 if at_most
                                                    else 1 - value / threshold))})
  return out


def sections(doc: Mapping[str, Any]) -> dict[str, Any]:
  """Every section of the report (the keys of ``SECTIONS``), from the raw job results."""
  jobs = doc["jobs"]
  rows = _train_rows(doc)
  flops = _flops(doc, rows)
  map_rows = _map_rows(doc)
  compile_rows = [{"id": r["id"], "name": r["name"], "batch": r["batch"],
                   "seconds": r["compile_s"]} for r in rows]
  emb = jobs.get("embed", {})
  embed_rows = []
  for key, label in (("jax_float32", "JAX jit float32"), ("jax_bfloat16", "JAX jit bf16 compute"),
                     ("torch_bilinear", "PyTorch eager nn.Bilinear"),
                     ("torch_einsum", "PyTorch eager einsum")):
    embed_rows.append({"name": label, "batch": emb.get("batch_size"),
                       "samples_per_s": emb.get(key, {}).get("samples_per_s"),
                       "error": emb.get("error")})
  epoch = _epoch(doc, rows)
  memory = [{"id": k, "host_peak_mib": _mib(r.get("host_peak_bytes")),
             "device_peak_mib": _mib(r.get("device_peak_bytes"))}
            for k, r in jobs.items() if "host_peak_bytes" in r]
  return {
      "machine": {"name": doc["machine_name"], **doc["machine"], **doc["accelerator"],
                  "allocator": doc["allocator"], "threads": doc["threads"],
                  "versions": doc["versions"]},
      "matmul_peak": {k: v for k, v in jobs.get("matmul_peak", {}).items()},
      "train_step": rows, "flops": flops, "compile": compile_rows, "memory": memory,
      "embed": embed_rows, "epoch": epoch, "profile": _profile(doc),
      "map": map_rows,
      "map_scaling": _scaling_rows(doc), "allocators": _allocators(doc),
      "ratios": _ratios(rows), "targets": _targets(doc, rows, flops, map_rows, epoch),
  }
