"""Benchmarks of DSF3N in JAX against the PyTorch baseline, in one command.

  python -m benchmarks.run            # full: 20-40 min on a 2-core CPU (35 min on AMD EPYC)
  python -m benchmarks.run --quick    # 6-13 min: batch 128 only, smaller mAP and epoch
  python -m benchmarks.run --smoke --out /tmp/bench   # tiny model, seconds (CI)
  python -m benchmarks.run --rerender results/X.json  # its sections and table again

Writes ``<machine>.json`` and ``<machine>.md`` (``-quick`` appended in quick
mode) under ``benchmarks/results/`` (or ``--out``) and prints the table.
``<machine>`` is derived from the accelerator, or from the CPU model and core
count (``cpu-amd-epyc-2c``). The same command uses a GPU or TPU when JAX sees
one (and CUDA PyTorch when installed).

Each measurement runs in a fresh subprocess (``--smoke``: in this process), so
peak memory, threads and the allocator are those of that measurement alone.
Children use ``--allocator`` (default ``auto``: glibc's transparent huge pages
when glibc >= 2.35, else jemalloc when installed); the full run also times the JAX step under
every available allocator. Every figure is the median, min and max over
repeated runs after warm-up, with the number of runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks import report, report_md, sysinfo

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# A model small enough to compile in seconds: one branch of one stage, one fusion stage.
SMOKE_MODEL = {"encoder_features": 128, "kernel_sizes": [3], "branch_features": [16],
               "stem_features": 8, "fusion_kw": {"num_stages": 1}, "head_kw": {"hidden": 16},
               "embed_dim": 8, "classifier_kw": {"hidden": 8}}

# Everything that differs between the modes. Sizes of the full mode follow VEGAS: 22,000
# training pairs, 5,621 test pairs, batch 128, 40 epochs.
PLANS: dict[str, dict[str, Any]] = {
    "full": {
        "model": {}, "train_batches": [128, 512], "embed_batch": 1024,
        "warmup": 2, "repeats": 5, "steps_per_repeat": 2, "budget_s": 60.0,
        "slow_warmup": 1, "slow_repeats": 3, "slow_budget_s": 60.0,
        "torch_compile": True, "data_parallel": True, "allocators": True, "bf16": True,
        "slow_batches": [128],
        "epoch": {"batch_size": 128, "num_examples": 22000, "repeats": 1,
                  "eval_examples": 5621, "eval_batch_size": 1024, "protocol_rounds": 3},
        # The on-device (lax.scan) epoch as well; short on CPU, where it is several times
        # slower per step than the streamed one (and "auto" does not pick it).
        "epoch_variants": {"scan": {"on_device": "true", "num_examples": 1280}},
        "profile": {"steps": 5, "warmup": 2},
        "map_compare": {"n": 5621, "original_n": 5621, "original_repeats": 2, "repeats": 3},
        "map_scaling": [(5621, 5621, 0), (20000, 4096, 0), (20000, 4096, 100),
                        (100000, 1024, 0), (100000, 1024, 100)],
        "matmul": {"n": 2048}, "timeout_s": 1800,
    },
    "quick": {
        "model": {}, "train_batches": [128], "embed_batch": 1024,
        "warmup": 1, "repeats": 3, "steps_per_repeat": 1, "budget_s": 15.0,
        "slow_warmup": 1, "slow_repeats": 1, "slow_budget_s": 1.0,
        "torch_compile": False, "data_parallel": False, "allocators": False, "bf16": True,
        "epoch": {"batch_size": 128, "num_examples": 2560, "repeats": 1,
                  "eval_examples": 5621, "eval_batch_size": 1024, "protocol_rounds": 2},
        "profile": {"steps": 3, "warmup": 1},
        "map_compare": {"n": 5621, "original_n": 1500, "original_repeats": 1, "repeats": 2},
        "map_scaling": [(20000, 1024, 0), (100000, 256, 100)],
        "matmul": {"n": 1024}, "timeout_s": 900,
    },
    "smoke": {
        "model": SMOKE_MODEL, "train_batches": [8], "embed_batch": 16,
        "warmup": 1, "repeats": 2, "steps_per_repeat": 1, "budget_s": 2.0,
        "slow_warmup": 1, "slow_repeats": 2, "slow_budget_s": 2.0,
        "torch_compile": False, "data_parallel": True, "allocators": False, "bf16": False,
        "epoch": {"batch_size": 8, "num_examples": 32, "repeats": 2,
                  "eval_examples": 20, "eval_batch_size": 16, "protocol_rounds": 3},
        # Also the on-device (lax.scan) epoch, which "auto" picks on GPU/TPU only.
        "epoch_variants": {"scan": {"on_device": "true"}},
        "profile": {"steps": 2, "warmup": 1},
        "map_compare": {"n": 200, "original_n": 200, "original_repeats": 2, "repeats": 2},
        "map_scaling": [(400, 100, 10)],
        "matmul": {"n": 128, "bilinear_shape": [24, 256, 16]}, "timeout_s": 300,
    },
}


def _training_jobs(add, p, *, common, slow, allocator: str, dp_devices, weights: str,
                   peak: dict[str, Any]) -> None:
  """The train-step jobs: JAX (float32, bf16, data-parallel), PyTorch, other allocators.

  ``peak``: the matmul peak job's products; the one-device JAX rows time them again in turn
  with their step (``interleaved_peak``).
  """
  one = {**common, "devices": "one",
         "interleaved_peak": {**peak, "rounds": max(int(common["repeats"]), 3)}}
  for b in p["train_batches"]:
    add(f"jax_train/float32/one/{b}", "jax_train", {**one, "batch_size": b, "dtype": "float32"})
    if p["bf16"]:
      add(f"jax_train/bfloat16/one/{b}", "jax_train",
          {**one, "batch_size": b, "dtype": "bfloat16"})
    if b == p["train_batches"][0]:  # what users of the deployable protocol train
      add(f"jax_train/unimodal_recipe/one/{b}", "jax_train",
          {**one, "batch_size": b, "dtype": "float32", "variants": "unimodal"})
    if p["data_parallel"]:
      add(f"jax_train/float32/all/{b}", "jax_train",
          {**common, "batch_size": b, "dtype": "float32", "devices": "all"},
          xla_devices=dp_devices)
    for einsum in (False, True):
      name = "einsum" if einsum else "bilinear"
      if not einsum and b not in p.get("slow_batches", p["train_batches"]):
        continue  # nn.Bilinear's backward on CPU: minutes per step at this batch
      add(f"torch_train/{name}/eager/{b}", "torch_train",
          {**(common if einsum else slow), "batch_size": b, "einsum": einsum,
           "weights": weights})
      if p["torch_compile"]:
        add(f"torch_train/{name}/compile/{b}", "torch_train",
            {**(common if einsum else slow), "batch_size": b, "einsum": einsum,
             "compile": True, "weights": weights})
  if p["allocators"]:
    b = p["train_batches"][0]
    for alloc in sysinfo.available_allocators():
      if alloc != allocator:
        add(f"allocator/{alloc}/{b}", "jax_train",
            {**common, "batch_size": b, "dtype": "float32", "devices": "one"}, alloc=alloc)


def plan_jobs(mode: str, *, accelerator: Mapping[str, Any], allocator: str,
              cores: int, weights: str) -> list[dict[str, Any]]:
  """The list of measurements of a mode: ``{"id", "case", "params", "allocator", "xla_devices"}``.

  Args:
    mode: "full", "quick" or "smoke".
    accelerator: ``sysinfo.accelerator_info()`` of this host.
    allocator: the allocator of every child.
    cores: usable CPU cores (the data-parallel split of a CPU host).
    weights: path of the npz the weights job writes and the PyTorch jobs read.

  Returns:
    Jobs, in the order they run.
  """
  p = PLANS[mode]
  common = {"model": p["model"], "warmup": p["warmup"], "repeats": p["repeats"],
            "steps_per_repeat": p["steps_per_repeat"], "budget_s": p["budget_s"]}
  slow = {**common, "warmup": p["slow_warmup"], "repeats": p["slow_repeats"],
          "budget_s": p["slow_budget_s"], "steps_per_repeat": 1}
  on_cpu = accelerator.get("jax_backend", "cpu") == "cpu"
  jobs: list[dict[str, Any]] = []

  def add(job_id, case, params, *, alloc=allocator, xla_devices=None):
    jobs.append({"id": job_id, "case": case, "params": params, "allocator": alloc,
                 "xla_devices": xla_devices})

  add("info", "info", {})
  bilinear_rows = 3 * p["train_batches"][0]
  peak = {"n": p["matmul"]["n"] if on_cpu else 8192,
          "bilinear_shape": p["matmul"].get("bilinear_shape", [bilinear_rows, 65536, 256])}
  add("matmul_peak", "matmul_peak", {**peak, "warmup": 2, "repeats": p["repeats"]})
  add("weights", "weights", {"model": p["model"], "path": weights})
  _training_jobs(add, p, common=common, slow=slow, allocator=allocator,
                 dp_devices=max(min(cores, 8), 2) if on_cpu else None, weights=weights,
                 peak=peak)
  add("embed", "embed", {**common, "batch_size": p["embed_batch"], "weights": weights,
                         "steps_per_repeat": 1})
  # The epoch as training runs it here (config.data.on_device="auto": lax.scan on GPU/TPU,
  # streamed batches on CPU), extrapolated to the 40-epoch recipe at VEGAS's size.
  epoch = {**p["epoch"], "model": p["model"], "budget_s": 1e9, "recipe_examples": 22000}
  add("epoch", "jax_epoch", {**epoch, "on_device": "auto"})
  for name, overrides in p.get("epoch_variants", {}).items():  # protocols timed once, above
    add(f"epoch/{name}", "jax_epoch", {**epoch, "protocol_rounds": 0, **overrides})
  add("profile", "jax_profile", {**p["profile"], "model": p["model"], "dtype": "float32",
                                 "batch_size": p["train_batches"][0], "top": 25})
  add("map_compare", "map_compare", {**p["map_compare"], "budget_s": p["budget_s"]})
  for items, queries, k in p["map_scaling"]:
    add(f"map_scaling/{items}/{queries}/{k}", "map_scaling",
        {"items": items, "queries": queries, "k": k, "repeats": 2 if mode == "full" else 1,
         "budget_s": p["budget_s"]})
  return jobs


def _child_env(job: Mapping[str, Any]) -> dict[str, str]:
  env = sysinfo.allocator_env(job["allocator"], os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if job.get("xla_devices"):
    flags.append(f"--xla_force_host_platform_device_count={job['xla_devices']}")
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
  return env


def run_job(job: Mapping[str, Any], *, in_process: bool, timeout_s: float,
            workdir: str) -> dict[str, Any]:
  """Runs one job; returns its figures, or ``{"error": ...}`` when it failed."""
  from benchmarks import cases
  load_before = sysinfo.load_average()
  t0 = time.perf_counter()
  if in_process:
    try:
      result = cases.CASES[job["case"]](job["params"])
    except Exception as e:  # a failed measurement is reported, not fatal
      result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
  else:
    out = os.path.join(workdir, job["id"].replace("/", "_") + ".json")
    cmd = [sys.executable, "-m", "benchmarks.run", "--case", job["case"], "--params",
           json.dumps(job["params"]), "--result", out]
    try:
      proc = subprocess.run(cmd, cwd=REPO, env=_child_env(job), capture_output=True, text=True,
                            timeout=timeout_s)
      if proc.returncode == 0 and os.path.exists(out):
        with open(out) as f:
          result = json.load(f)
      else:
        result = {"error": f"exit status {proc.returncode}",
                  "stderr": proc.stderr[-3000:]}
    except subprocess.TimeoutExpired:
      result = {"error": f"timed out after {timeout_s:.0f} s"}
  result["job_wall_s"] = time.perf_counter() - t0
  result["load_average_before"] = load_before
  result["load_average_after"] = sysinfo.load_average()
  result["allocator_requested"] = job["allocator"]
  if job.get("xla_devices"):
    result["xla_force_host_platform_device_count"] = job["xla_devices"]
  return result


def run_benchmarks(*, mode: str, out_dir: pathlib.Path, allocator: str = "auto",
                   only: Sequence[str] = (), name: str | None = None,
                   log=print) -> dict[str, Any]:
  """Runs every job of ``mode`` and writes ``<machine>.json`` and ``<machine>.md``.

  Args:
    mode: "full", "quick" or "smoke" (smoke runs in this process).
    out_dir: where the two files go.
    allocator: "auto", "default", "jemalloc" or "hugetlb".
    only: run only jobs whose id starts with one of these prefixes (plus "info" and
      "weights", which others need).
    name: file name stem instead of the machine's.
    log: progress printer.

  Returns:
    The whole result (what the JSON file holds), with ``paths`` added.
  """
  if mode not in PLANS:
    raise ValueError(f"mode: expected one of {sorted(PLANS)}, got {mode!r}")
  in_process = mode == "smoke"
  allocator = _resolve_allocator(allocator, in_process=in_process)
  out_dir.mkdir(parents=True, exist_ok=True)
  started = time.time()
  with tempfile.TemporaryDirectory(prefix="dsf3n_bench_") as workdir:
    weights = os.path.join(workdir, "weights.npz")
    info_job = {"id": "info", "case": "info", "params": {}, "allocator": allocator}
    info = run_job(info_job, in_process=in_process, timeout_s=600, workdir=workdir)
    if "error" in info:
      raise RuntimeError(f"benchmark setup failed: {info['error']}\n{info.get('stderr', '')}")
    jobs = plan_jobs(mode, accelerator=info["accelerator"], allocator=allocator,
                     cores=info["machine"]["usable_cores"], weights=weights)
    if only:
      unknown = [o for o in only if not any(j["id"].startswith(o) for j in jobs)]
      if unknown:
        raise ValueError(f"--only={','.join(unknown)}: no job id starts with it; the "
                         f"{mode} jobs: {', '.join(j['id'] for j in jobs)}")
      jobs = [j for j in jobs if j["id"] in ("info", "weights")
              or any(j["id"].startswith(o) for o in only)]
    results: dict[str, Any] = {"info": info}
    for i, job in enumerate(jobs):
      if job["id"] == "info":
        continue
      log(f"[{i}/{len(jobs) - 1}] {job['id']} ...", end=" ", flush=True)
      result = run_job(job, in_process=in_process, timeout_s=PLANS[mode]["timeout_s"],
                       workdir=workdir)
      results[job["id"]] = result
      log("FAILED: " + result["error"].splitlines()[0] if "error" in result
          else f"{result['job_wall_s']:.1f} s")
  slug = name or sysinfo.machine_slug(info["machine"], info["accelerator"])
  if mode != "full" and not name:
    slug += f"-{mode}"
  document = {
      "mode": mode, "machine_name": slug, "command": " ".join(["python -m benchmarks.run",
                                                               *sys.argv[1:]]),
      "started": info["machine"]["date"], "wall_s": time.time() - started,
      "allocator": allocator, "plan": PLANS[mode],
      "machine": info["machine"], "accelerator": info["accelerator"],
      "versions": info["versions"], "threads": info["threads"],
      "jobs": results,
  }
  document["sections"] = report.sections(document)
  document["paths"] = _write(document, out_dir, slug)
  return document


def _resolve_allocator(allocator: str, *, in_process: bool) -> str:
  """``auto``: the allocator measured best here; checked (an unavailable one fails now)."""
  if allocator == "auto":
    available = sysinfo.available_allocators()
    # Measured on the 2-core CPU (JAX step, batch 128; results/cpu-amd-epyc-2c.md): glibc
    # with huge pages faults 2-3.5k pages per step, jemalloc (oversize_threshold:0) ~1.7k,
    # plain glibc 135-235k (0.5-0.9 GiB of fresh memory).
    allocator = next(a for a in ("hugetlb", "jemalloc", "default") if a in available)
  sysinfo.allocator_env(allocator, {})  # fails early, naming the flag, if unavailable
  if not in_process:
    return allocator
  # Two host devices for the data-parallel case; must precede the first jax import.
  if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=2").strip()
  return sysinfo.active_allocator()


def _write(document: Mapping[str, Any], out_dir: pathlib.Path, slug: str) -> list[str]:
  """``<slug>.json`` and ``<slug>.md``, each written whole (a temporary file renamed)."""
  json_path, md_path = out_dir / f"{slug}.json", out_dir / f"{slug}.md"
  from dsf3n_jax.paths import atomic_write
  for path, text in ((json_path, json.dumps(document, indent=1, default=str)),
                     (md_path, report_md.markdown(document))):
    atomic_write(path, text)
  return [str(json_path), str(md_path)]


def _run_case(case: str, params_json: str, result_path: str) -> None:
  from benchmarks import cases
  if case not in cases.CASES:
    raise SystemExit(f"--case: expected one of {sorted(cases.CASES)}, got {case!r}")
  result = cases.CASES[case](json.loads(params_json))
  with open(result_path, "w") as f:
    json.dump(result, f, default=str)


def main(argv: Sequence[str] | None = None) -> int:
  """Command line; see the module docstring."""
  parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  modes = parser.add_mutually_exclusive_group()
  modes.add_argument("--quick", action="store_true", help="the 6-13 minute version")
  modes.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
  parser.add_argument("--out", default=None, help=f"output folder (default {RESULTS})")
  parser.add_argument("--allocator", default="auto",
                      choices=("auto", *sysinfo.ALLOCATORS),
                      help="memory allocator of the measuring subprocesses")
  parser.add_argument("--only", action="extend", default=[],
                      type=lambda v: [o for o in v.split(",") if o],
                      help="run only jobs whose id starts with this (repeatable, or "
                      "comma-separated)")
  parser.add_argument("--name", default=None, help="output file stem instead of the machine's")
  parser.add_argument("--rerender", default=None, metavar="FILE.json",
                      help="recompute a results file's sections and Markdown from its jobs "
                      "with this version's report (the measurements are not repeated)")
  parser.add_argument("--case", help=argparse.SUPPRESS)
  parser.add_argument("--params", help=argparse.SUPPRESS)
  parser.add_argument("--result", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.case:
    _run_case(args.case, args.params or "{}", args.result)
    return 0
  if args.rerender:
    path = pathlib.Path(args.rerender)
    try:
      document = json.loads(path.read_text())
      document["sections"] = report.sections(document)
    except (OSError, ValueError, KeyError) as e:
      parser.error(f"--rerender={path}: not a results file of benchmarks.run ({e})")
    document["paths"] = _write(document, path.parent, path.stem)
    print("wrote " + " and ".join(document["paths"]))
    return 0
  mode = "smoke" if args.smoke else "quick" if args.quick else "full"
  out_dir = pathlib.Path(args.out) if args.out else RESULTS
  log = lambda *a, **k: print(*a, file=sys.stderr, **k)
  try:
    document = run_benchmarks(mode=mode, out_dir=out_dir, allocator=args.allocator,
                              only=args.only, name=args.name, log=log)
  except ValueError as e:
    if str(e).startswith("--only"):
      parser.error(str(e))
    raise
  print(report_md.markdown(document))
  log("wrote " + " and ".join(document["paths"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
