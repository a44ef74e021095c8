"""Turns the raw job results of ``benchmarks.run`` into sections, ratios, targets and Markdown.

``sections(document)`` is machine-readable (it goes into the JSON file);
``markdown(document)`` renders it. A failed job shows up as a row with its
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
# The targets for the 2-core CPU (batch 128, float32).
TARGETS = {"jax_samples_per_s": 180.0, "fraction_of_matmul_peak": 0.8,
           "speedup_vs_original": 25.0, "speedup_vs_best_pytorch": 1.4,
           "map_speedup_vs_original": 100.0}


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
                 "dtype": parts[1] if parts[0] == "jax_train" else "float32",
                 "samples_per_s": r.get("samples_per_s"),
                 "compile_s": r.get("compile_s", r.get("first_call_s")),
                 "host_peak_mib": _mib(r.get("host_peak_bytes")),
                 "device_peak_mib": _mib(r.get("device_peak_bytes")),
                 "minor_faults_per_step": r.get("minor_faults_per_step"),
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
    if rate is None or out["flops_per_sample"] is None:
      continue
    gflops = rate * out["flops_per_sample"] / 1e9
    peak_key = "peak_bfloat16_gflops" if r["dtype"] == "bfloat16" else "peak_float32_gflops"
    r["achieved_gflops"] = gflops
    r["fraction_of_peak"] = gflops / out[peak_key] if out[peak_key] else None
    out["rows"].append({"id": r["id"], "achieved_gflops": gflops,
                        "fraction_of_peak": r["fraction_of_peak"], "peak": peak_key})
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


def _targets(doc, rows, flops, map_rows) -> list[dict[str, Any]]:
  def row(id_prefix, batch=128):
    return next((r for r in rows if r["id"].startswith(id_prefix) and r["batch"] == batch), None)

  jax_row = row("jax_train/float32/one/")
  jax_rate = _median(jax_row["samples_per_s"]) if jax_row else None
  orig = row("torch_train/bilinear/eager/")
  torch_rates = [_median(r["samples_per_s"]) for r in rows
                 if r["framework"] == "torch" and r["batch"] == 128 and _median(r["samples_per_s"])]
  best_torch = max(torch_rates) if torch_rates else None
  ours_map = next((r for r in map_rows if r.get("key") == "ours" and r.get("speedup_vs_original")),
                  None)
  measured = {
      "jax_samples_per_s": jax_rate,
      "fraction_of_matmul_peak": jax_row.get("fraction_of_peak") if jax_row else None,
      "speedup_vs_original": (jax_rate / _median(orig["samples_per_s"])
                              if jax_rate and orig and _median(orig["samples_per_s"]) else None),
      "speedup_vs_best_pytorch": jax_rate / best_torch if jax_rate and best_torch else None,
      "map_speedup_vs_original": ours_map["speedup_vs_original"] if ours_map else None,
  }
  text = {
      "jax_samples_per_s": "JAX float32 training, batch 128, samples/s",
      "fraction_of_matmul_peak": "achieved FLOP/s / measured float32 matmul peak",
      "speedup_vs_original": "JAX / PyTorch eager nn.Bilinear (original), batch 128",
      "speedup_vs_best_pytorch": "JAX / best PyTorch variant, batch 128",
      "map_speedup_vs_original": (f"mAP: ours / original loop at "
                                  f"{ours_map['n'] if ours_map else '?'}^2"),
  }
  out = []
  for key, threshold in TARGETS.items():
    value = measured[key]
    out.append({"target": key, "description": text[key], "threshold": threshold,
                "measured": value, "met": None if value is None else value >= threshold,
                "shortfall_percent": (None if value is None or value >= threshold
                                      else 100.0 * (1 - value / threshold))})
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
  memory = [{"id": k, "host_peak_mib": _mib(r.get("host_peak_bytes")),
             "device_peak_mib": _mib(r.get("device_peak_bytes"))}
            for k, r in jobs.items() if "host_peak_bytes" in r]
  return {
      "machine": {"name": doc["machine_name"], **doc["machine"], **doc["accelerator"],
                  "allocator": doc["allocator"], "threads": doc["threads"],
                  "versions": doc["versions"]},
      "matmul_peak": {k: v for k, v in jobs.get("matmul_peak", {}).items()},
      "train_step": rows, "flops": flops, "compile": compile_rows, "memory": memory,
      "embed": embed_rows, "epoch": _epoch(doc, rows), "profile": _profile(doc),
      "map": map_rows,
      "map_scaling": _scaling_rows(doc), "allocators": _allocators(doc),
      "ratios": _ratios(rows), "targets": _targets(doc, rows, flops, map_rows),
  }


# ----------------------------------------------------------------------------
# Markdown.


def _f(x, digits: int = 3) -> str:
  if x is None:
    return "-"
  if isinstance(x, bool):
    return "yes" if x else "no"
  if abs(x) >= 1000:
    return f"{x:,.0f}"
  return f"{x:.{digits}g}"


def _s(st) -> tuple[str, str, str, str]:
  if not st or st.get("median") is None:
    return "-", "-", "-", "0"
  return _f(st["median"]), _f(st["min"]), _f(st["max"]), str(st["n"])


def _table(header, rows) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines + [""]


def _epoch_markdown(e: Mapping[str, Any]) -> list[str]:
  epochs = e["recipe_epochs"]
  lines = [f"### One epoch end to end and the {epochs}-epoch recipe"]
  if not e["rows"]:
    return lines + ["not run", ""]
  body = []
  recipe = None
  for r in e["rows"]:
    if r["error"]:
      body.append((r["name"], "failed", r["error"].splitlines()[0][:80], *[""] * 8))
      continue
    recipe = r["recipe"]
    scaled = " (scaled)" if recipe["scaled_from_steps"] else ""
    body.append((r["name"], f"{r['num_examples']:,} / {r['batch']}", *_s(r["epoch_s"]),
                 _f(_median(r["samples_per_s"])), _f(r["compile_s"]),
                 _f(r["evaluation_s"]) if r["evaluation_s"] else "-",
                 _f(recipe["train_s"] / 60) + scaled,
                 _f(recipe["total_s"] / 60) + scaled if recipe["total_s"] else "-"))
  for name, secs in e["pytorch_recipe_s_extrapolated"].items():
    body.append((name + " (from its step rate)",
                 f"{recipe['examples']:,} / {e['rows'][0]['batch']}" if recipe else "",
                 _f(secs / epochs), "", "", "", "", "", "", _f(secs / 60), ""))
  lines += _table(("implementation", "examples / batch", "epoch s median", "min", "max", "n",
                   "samples/s", "compile s", "1 evaluation s", f"{epochs} epochs, min",
                   "recipe with evaluations, min"), body)
  if recipe:
    ev = next((r for r in e["rows"] if r.get("evaluation_s")), None)
    lines.append(
        f"Recipe: {recipe['epochs']} epochs of {recipe['examples']:,} examples "
        f"({recipe['steps_per_epoch']} steps)"
        + (f", epoch time scaled linearly from the {recipe['scaled_from_steps']} steps measured"
           if recipe["scaled_from_steps"] else "")
        + f"; includes {recipe['includes']}."
        + (f" {recipe['evaluations']} evaluations of {ev['evaluation_examples']:,} test pairs; "
           f"one evaluation {_f(ev['evaluation_s'])} s (the embedding alone "
           f"{_f(ev['embed_s'])} s), the first {_f(ev['evaluation_first_call_s'])} s."
           if ev else "")
        + "".join(f" {r['name']}: evaluation failed: {r['evaluation_error']}."
                  for r in e["rows"] if r.get("evaluation_error"))
        + "".join(f" {r['name']}: the batches alone (TrainLoader, no step) take "
                  f"{_f(r['loader_epoch_s'])} s per epoch." for r in e["rows"]
                  if r.get("loader_epoch_s") is not None)
        + " PyTorch rows: the recipe's samples over the PyTorch step rate (no evaluation).")
    lines.append("")
  return lines


def _profile_markdown(p: Mapping[str, Any]) -> list[str]:
  lines = ["### Where the training step's time goes (JAX float32, 1 device, XLA profile)"]
  if "error" in p:
    return lines + [f"failed: {p['error']}", ""]
  wall = _median(p["wall_s"])
  lines.append(
      f"Batch {p['batch_size']}, {p['steps_traced']} traced steps, medians: wall "
      f"{_f(wall)} s per step untraced ({_f(p['batch_size'] / wall)} samples/s), "
      f"{_f(_median(p['traced_wall_s']))} s traced; from the first op's start to the last "
      f"op's end {_f(_median(p['span_s']))} s. Thread time (ops and executor) "
      f"{_f(_median(p['cpu_s']))} s per step on {p['cores']} cores (idle core time within the "
      f"span {_f(_median(p['idle_core_s']))} s). {_f(p['ops_per_step'])} ops per step. "
      f"FLOPs of the products and convolutions {_f(p['op_flops_per_step'] / 1e9)} GFLOP per "
      f"step (XLA cost analysis of the whole step: {_f((p['flops_per_step'] or 0) / 1e9)}).")
  lines.append("")

  def gf(x):
    return _f(x) if x else "-"

  lines += _table(
      ("category", "ops", "thread s / step", "share", "elapsed s", "GFLOP / step", "GFLOP/s",
       "GFLOP/s per thread"),
      [(c["category"], c["ops"], _f(c["cpu_s"]), f"{100 * c['share']:.1f} %",
        _f(c["elapsed_s"]), gf(c["flops"] / 1e9), gf(c["gflops"]), gf(c["gflops_per_thread"]))
       for c in p["categories"]])
  lines += _table(
      ("op", "category", "from", "shape", "thread ms", "share", "elapsed ms", "GFLOP",
       "GFLOP/s", "per thread"),
      [(f"`{o['op']}`", o["category"], o["source"][:60] or "-", f"`{(o['shape'] or '-')[:38]}`",
        _f(1e3 * o["cpu_s"]), f"{100 * o['share']:.1f} %", _f(1e3 * o["elapsed_s"]),
        gf(o["flops"] / 1e9), gf(o["gflops"]), gf(o["gflops_per_thread"]))
       for o in p["ops"][:PROFILE_TOP]])
  if p.get("layers"):
    lines += _table(("layer (forward and backward)", "ops", "thread s / step", "share",
                     "GFLOP / step"),
                    [(r["layer"], r["ops"], _f(r["cpu_s"]), f"{100 * r['share']:.1f} %",
                      gf(r["flops"] / 1e9)) for r in p["layers"][:PROFILE_TOP // 2]])
  lines.append(
      "Thread time: all threads' time on the op per step, pool tasks included (shares add up "
      "to 100 %); elapsed: time during which at least one thread worked on it (ops overlap on "
      "the thunk executor's threads). GFLOP/s = FLOPs / elapsed; per thread = FLOPs / thread "
      "time, to compare with the matmul peak divided by the cores. \"fwd\"/\"bwd\": forward "
      "or backward pass of the named layer.")
  lines.append("")
  return lines


def markdown(doc: Mapping[str, Any]) -> str:
  """The report as Markdown: machine header, then one table per section."""
  sec = doc["sections"]
  lines = _header_markdown(doc)
  lines += _train_markdown(sec)
  if sec["ratios"]:
    lines.append("### Ratios JAX (float32, 1 device) / PyTorch, same batch")
    lines += _table(("batch", "PyTorch variant", "JAX / PyTorch"),
                    [(r["batch"], r["pytorch"], f"{r['ratio']:.1f}x") for r in sec["ratios"]])

  lines.append("### Embedding (eval forward, 4 outputs), samples/s")
  lines += _table(("implementation", "batch", "median", "min", "max", "n"),
                  [(r["name"], r["batch"], *_s(r["samples_per_s"])) for r in sec["embed"]])

  lines += _epoch_markdown(sec["epoch"])
  lines += _profile_markdown(sec["profile"])

  lines += _map_and_targets_markdown(sec)
  return "\n".join(lines)


def _header_markdown(doc: Mapping[str, Any]) -> list[str]:
  """The machine, versions, threads, allocator, date and command."""
  m = doc["sections"]["machine"]
  threads = m["threads"]
  ver = m["versions"]
  lines = [f"## DSF3N benchmarks: {m['name']} ({doc['mode']} mode)", "",
           f"- Machine: {m['cpu_model']}, {m['cores']} cores ({m['usable_cores']} usable), "
           f"{_f((m.get('memory_bytes') or 0) / 2**30)} GiB RAM; JAX backend "
           f"**{m.get('jax_backend')}** ({m.get('jax_devices')} x {m.get('jax_device_kind')})"
           + (f"; torch device {m['torch_device']}" if m.get("torch_device") else ""),
           f"- Versions: python {ver.get('python')}, jax {ver.get('jax')}, jaxlib "
           f"{ver.get('jaxlib')}, flax {ver.get('flax')}, torch {ver.get('torch')}, numpy "
           f"{ver.get('numpy')}, scikit-learn {ver.get('scikit-learn')}",
           f"- Threads: torch {threads.get('torch.get_num_threads')} intra-op / "
           f"{threads.get('torch.get_num_interop_threads')} inter-op; XLA_FLAGS="
           f"`{threads.get('XLA_FLAGS') or ''}`; OMP_NUM_THREADS={threads.get('OMP_NUM_THREADS')}",
           f"- Allocator of the measuring processes: **{m['allocator']}**; CPU flags: "
           f"{' '.join(m.get('cpu_flags') or [])}",
           f"- Date {doc['started']}; total {doc['wall_s'] / 60:.1f} min; load average at start "
           f"{m.get('load_average')} (other work on the host lowers every figure)",
           f"- Command: `{doc['command']}`. Figures: median, min, max over n runs after "
           "warm-up.", ""]
  return lines


def _train_markdown(sec: Mapping[str, Any]) -> list[str]:
  """The training-step table and the FLOP counts it is read against."""
  lines = []
  lines.append("### Training step (forward, loss, backward, both optimiser updates), samples/s")
  body = []
  for r in sec["train_step"]:
    if r.get("error"):
      body.append((r["name"], r["batch"], r["dtype"], "failed", "", "", "", "", "", "",
                   r["error"].splitlines()[0][:80]))
      continue
    body.append((r["name"], r["batch"], r["dtype"], *_s(r["samples_per_s"]),
                 _f(r.get("achieved_gflops")),
                 _f(100 * r["fraction_of_peak"]) + " %" if r.get("fraction_of_peak") else "-",
                 _f(r["compile_s"]), _f(r["host_peak_mib"])))
  lines += _table(("implementation", "batch", "dtype", "median", "min", "max", "n",
                   "GFLOP/s", "of peak", "compile / 1st call s", "peak host MiB"), body)
  fl = sec["flops"]
  lines.append(f"FLOPs per sample (XLA cost analysis, training step): "
               f"{_f((fl['flops_per_sample'] or 0) / 1e9)} GFLOP. Measured matmul peak: "
               f"{_f(fl['peak_float32_gflops'])} GFLOP/s float32, "
               f"{_f(fl['peak_bfloat16_gflops'])} GFLOP/s bf16 operands (f32 accumulation). "
               "\"of peak\" divides by the peak of the row's dtype.")
  lines.append("")
  return lines


def _map_and_targets_markdown(sec: Mapping[str, Any]) -> list[str]:
  """The mAP tables, the allocators and the targets."""
  lines = []
  lines.append("### mAP (audio -> visual, all items ranked, cosine), seconds")
  lines += _table(("implementation", "size", "median", "min", "max", "n", "1st call s", "mAP",
                   "speed-up vs original"),
                  [(r["implementation"], f"{r['n']:,}^2", *_s(r["seconds"]),
                    _f(r["first_call_s"]), f"{r['map']:.6f}",
                    _f(r["speedup_vs_original"]) + "x" if r["speedup_vs_original"] else "-")
                   for r in sec["map"] if "error" not in r])
  lines.append("### Our mAP kernel at scale (time for `queries` queries; square time "
               "extrapolated linearly in queries)")
  lines += _table(("items", "queries", "k", "median s", "min", "max", "n", "items^2 s (extrap.)"),
                  [(f"{r['items']:,}", f"{r['queries']:,}", r["k"] or "all", *_s(r["seconds"]),
                    _f(r["square_seconds_extrapolated"])) for r in sec["map_scaling"]])

  if sec["allocators"]:
    lines.append("### Allocator (JAX float32 step, 1 device)")
    lines += _table(("allocator", "batch", "median samples/s", "min", "max", "n",
                     "page faults / step", "fresh MiB / step"),
                    [(r["allocator"], r["batch"], *_s(r["samples_per_s"]),
                      _f(r["minor_faults_per_step"]), _f(r["page_mib_per_step"]))
                     for r in sec["allocators"]])

  lines.append("### Targets (2-core CPU, batch 128, float32)")
  lines += _table(("target", "threshold", "measured", "met", "missed by"),
                  [(t["description"], _f(t["threshold"]), _f(t["measured"]), _f(t["met"]),
                    f"{t['shortfall_percent']:.0f} %" if t["shortfall_percent"] else "-")
                   for t in sec["targets"]])
  return lines


