"""The Markdown of a benchmark run: machine header, then one table per section of
``benchmarks.report.sections``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.report import PROFILE_TOP, _median


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
        + (f"; the rows marked (scaled): epoch time scaled linearly from the "
           f"{recipe['scaled_from_steps']} steps measured, the others a whole epoch timed"
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
    pr = next((r["evaluation_protocols"] for r in e["rows"] if r.get("evaluation_protocols")),
              None)
    if pr:
      def ratio(key):
        low, high = pr.get(f"{key}_over_paired_pass_range") or (None, None)
        return (_f(pr[f"{key}_over_paired_pass"]),
                "-" if low is None else f"{_f(low)} - {_f(high)}")

      rounds = pr.get("rounds", 1)
      lines.append(f"Each pass and evaluation compiled and run once, then timed in turn, "
                   f"{rounds} round{'s' * (rounds != 1)}: seconds are medians over the rounds, "
                   f"ratios the median of each round's ratio to the same round's paired pass.")
      lines.append("")
      lines += _table(("evaluation of the test split", "s", "x one paired pass",
                       "ratio, least - greatest round"), [
          ("paired embedding pass", _f(pr["embed_paired_s"]), "1", "-"),
          ("unimodal embedding pass (each modality alone)", _f(pr["embed_unimodal_s"]),
           *ratio("embed_unimodal")),
          ("both protocols, one pass", _f(pr["embed_both_s"]), *ratio("embed_both")),
          ("intermediate evaluation, paper's recipe (paired: loss, mAP)",
           _f(pr["selection_evaluation_s"]), *ratio("selection_evaluation")),
          ("intermediate evaluation, :unimodal recipe (mAP alone)",
           _f(pr["unimodal_evaluation_s"]), *ratio("unimodal_evaluation")),
          ("last evaluation (both protocols)", _f(pr["final_evaluation_s"]),
           *ratio("final_evaluation"))])
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


def _percent(x: float | None) -> str:
  return _f(100 * x) + " %" if x else "-"


def _train_markdown(sec: Mapping[str, Any]) -> list[str]:
  """The training-step table and the FLOP counts it is read against."""
  lines = []
  lines.append("### Training step (forward, loss, backward, both optimiser updates), samples/s")
  body = []
  for r in sec["train_step"]:
    if r.get("error"):
      body.append((r["name"], r["batch"], r["dtype"], "failed", "", "", "", "", "", "", "",
                   r["error"].splitlines()[0][:80]))
      continue
    body.append((r["name"], r["batch"], r["dtype"], *_s(r["samples_per_s"]),
                 _f(r.get("achieved_gflops")), _percent(r.get("fraction_of_peak")),
                 _percent(r.get("fraction_of_peak_interleaved")),
                 _f(r["compile_s"]), _f(r["host_peak_mib"])))
  lines += _table(("implementation", "batch", "dtype", "median", "min", "max", "n",
                   "GFLOP/s", "of peak", "of peak, interleaved", "compile / 1st call s",
                   "peak host MiB"), body)
  fl = sec["flops"]
  lines.append(f"FLOPs per sample (XLA cost analysis, training step): "
               f"{_f((fl['flops_per_sample'] or 0) / 1e9)} GFLOP. Measured matmul peak: "
               f"{_f(fl['peak_float32_gflops'])} GFLOP/s float32, "
               f"{_f(fl['peak_bfloat16_gflops'])} GFLOP/s bf16 operands (f32 accumulation). "
               "\"of peak\" divides by the peak of the row's dtype; \"interleaved\": the "
               "row's step and the peak's products timed in turn in the row's own process, the "
               "median of the rounds' ratios (a host whose speed drifts between jobs does not "
               "move it).")
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

  lines.append("### Targets (batch 128, float32 unless named)")
  lines += _table(("target", "threshold", "measured", "met", "missed by"),
                  [(t["description"],
                    ("≤ " if t.get("direction") == "at most" else "≥ ") + _f(t["threshold"]),
                    _f(t["measured"]), _f(t["met"]),
                    f"{t['shortfall_percent']:.0f} %" if t["shortfall_percent"] else "-")
                   for t in sec["targets"]])
  return lines


