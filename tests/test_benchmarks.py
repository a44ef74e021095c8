"""Tests of the benchmark command: the smoke run end to end, the mAP baselines, the report."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import cases, original_map, report, sysinfo
from dsf3n_jax import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_smoke_run_writes_every_section(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out",
                         str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (json_path,) = tmp_path.glob("*-smoke.json")
  assert json_path.with_suffix(".md").exists()
  doc = json.loads(json_path.read_text())
  assert set(report.SECTIONS) <= set(doc["sections"])
  failed = {k: v["error"] for k, v in doc["jobs"].items() if "error" in v}
  assert not failed, failed
  sec = doc["sections"]
  for key in ("cpu_model", "cores", "memory_bytes", "jax_backend", "versions", "threads"):
    assert sec["machine"][key] is not None, key
  assert "torch.get_num_threads" in sec["machine"]["threads"]
  rows = {r["id"]: r for r in sec["train_step"]}
  for prefix in ("jax_train/float32/one/", "jax_train/float32/all/",
                 "torch_train/bilinear/eager/", "torch_train/einsum/eager/", "epoch"):
    row = next(r for k, r in rows.items() if k.startswith(prefix))
    st = row["samples_per_s"]
    assert st["n"] >= 1 and 0 < st["min"] <= st["median"] <= st["max"], (prefix, st)
  assert sec["flops"]["flops_per_sample"] > 0
  assert sec["matmul_peak"]["peak_float32_gflops"] > 0
  assert all(r["samples_per_s"]["median"] > 0 for r in sec["embed"])
  assert sec["epoch"]["recipe_s_extrapolated"] > 0
  maps = {r["key"]: r["map"] for r in sec["map"]}
  assert set(maps) == {"ours", "original", "numpy", "sklearn"}
  assert max(maps.values()) - min(maps.values()) < 1e-6, maps
  assert sec["map_scaling"] and sec["map_scaling"][0]["seconds"]["median"] > 0
  assert {t["target"] for t in sec["targets"]} == set(report.TARGETS)
  assert len(sec["ratios"]) == 2
  printed = proc.stdout
  assert "### Training step" in printed and "PyTorch eager, nn.Bilinear" in printed


def test_map_baselines_agree_with_our_kernel():
  visual, audio, labels = original_map.synthetic_embeddings(150, num_classes=5, seed=3)
  ours = metrics.mean_average_precision(audio, visual, labels, labels, distance="cosine")
  assert original_map.fx_calc_map_label(audio, visual, labels) == pytest.approx(ours, abs=1e-9)
  assert original_map.numpy_map(audio, visual, labels, labels,
                                block_size=64) == pytest.approx(ours, abs=1e-9)
  assert original_map.sklearn_map(audio, visual, labels, labels) == pytest.approx(ours, abs=1e-9)
  # The original's k walks the first k ranked items.
  ours_k = metrics.mean_average_precision(audio, visual, labels, labels, k=10)
  assert original_map.fx_calc_map_label(audio, visual, labels, k=10) == pytest.approx(ours_k,
                                                                                      abs=1e-9)


def test_allocator_env_selects_and_rejects():
  base = {"LD_PRELOAD": "/x/libjemalloc.so.2:/y/other.so",
          "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2", "A": "1"}
  env = sysinfo.allocator_env("default", base)
  assert env["LD_PRELOAD"] == "/y/other.so"
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2" and env["A"] == "1"
  with pytest.raises(ValueError, match="--allocator"):
    sysinfo.allocator_env("tcmalloc", base)
  if "jemalloc" in sysinfo.available_allocators():
    env = sysinfo.allocator_env("jemalloc", {})
    assert "jemalloc" in env["LD_PRELOAD"] and env["MALLOC_CONF"] == "oversize_threshold:0"
  if "hugetlb" in sysinfo.available_allocators():
    assert sysinfo.allocator_env("hugetlb", {})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_machine_slug_is_file_safe():
  machine = {"cpu_model": "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", "cores": 2}
  assert sysinfo.machine_slug(machine, {"jax_backend": "cpu"}) == "cpu-intel-xeon-platinum-8480-2c"
  assert sysinfo.machine_slug(machine, {"jax_backend": "gpu", "jax_device_kind": "NVIDIA H100",
                                        "jax_devices": 8}) == "gpu-nvidia-h100-x8"


def test_repeat_and_stats():
  calls = []
  times = cases.repeat(lambda: calls.append(1), warmup=2, repeats=4)
  assert len(calls) == 6 and len(times) == 4
  # A budget stops after the first timed call, never before it.
  assert len(cases.repeat(lambda: None, warmup=0, repeats=5, budget_s=0.0)) == 1
  st = cases.stats([3.0, 1.0, 2.0])
  assert (st["median"], st["min"], st["max"], st["n"]) == (2.0, 1.0, 3.0, 3)
  assert cases.rates(10.0, [1.0, 2.0])["max"] == 10.0


def _fake_document():
  def st(x):
    return cases.stats([x, x * 0.9, x * 1.1])

  jobs = {
      "info": {}, "matmul_peak": {"peak_float32_gflops": 200.0, "peak_bfloat16_gflops": 600.0},
      "jax_train/float32/one/128": {"samples_per_s": st(150.0), "compile_s": 5.0,
                                    "flops_per_sample": 0.83e9, "host_peak_bytes": 2**30},
      "torch_train/bilinear/eager/128": {"samples_per_s": st(5.0), "first_call_s": 30.0},
      "torch_train/einsum/eager/128": {"samples_per_s": st(100.0), "first_call_s": 2.0},
      "torch_train/einsum/compile/128": {"error": "RuntimeError: no compiler"},
      "map_compare": {"5621": {"n": 5621, "ours": {"seconds": st(0.1), "first_call_s": 1.0,
                                                   "map": 0.5},
                               "original": {"seconds": st(9.0), "first_call_s": 9.0,
                                            "map": 0.5}}},
  }
  machine = {"cpu_model": "x", "cores": 2, "usable_cores": 2, "memory_bytes": 2**30}
  return {"mode": "full", "machine_name": "m", "machine": machine, "accelerator": {},
          "allocator": "default", "threads": {}, "versions": {}, "jobs": jobs,
          "started": "today", "wall_s": 1.0, "command": "c"}


def test_report_targets_ratios_and_failed_rows():
  doc = _fake_document()
  doc["sections"] = report.sections(doc)
  sec = doc["sections"]
  targets = {t["target"]: t for t in sec["targets"]}
  assert targets["jax_samples_per_s"]["met"] is False
  assert targets["jax_samples_per_s"]["shortfall_percent"] == pytest.approx(100 * (1 - 150 / 180))
  assert targets["speedup_vs_original"]["measured"] == pytest.approx(30.0)
  assert targets["speedup_vs_best_pytorch"]["measured"] == pytest.approx(1.5)
  assert targets["speedup_vs_best_pytorch"]["met"] is True
  assert targets["map_speedup_vs_original"]["measured"] == pytest.approx(90.0)
  assert targets["fraction_of_matmul_peak"]["measured"] == pytest.approx(150 * 0.83 / 200)
  assert sorted(r["ratio"] for r in sec["ratios"]) == pytest.approx([1.5, 30.0])
  text = report.markdown(doc)
  assert "RuntimeError: no compiler" in text  # a failed variant is a row, not a gap
  assert "missed by" in text and "17 %" in text
  assert np.isclose(sec["flops"]["flops_per_sample"], 0.83e9)
