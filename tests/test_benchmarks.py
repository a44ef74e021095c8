"""Tests of the benchmark command: the smoke run end to end, the mAP baselines, the report."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import cases_torch, harness, hlo, op_trace, original_map, report, report_md, sysinfo
from dsf3n_jax import metrics
from tests import suite_xla

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_only_refuses_a_prefix_no_job_has(tmp_path, capsys):
  from benchmarks import run
  with pytest.raises(ValueError, match=r"--only=jax_trian: no job id starts with it; the smoke "
                                       r"jobs: .*jax_train/float32/one/"):
    run.run_benchmarks(mode="smoke", out_dir=tmp_path, only=["jax_train", "jax_trian"],
                       log=lambda *a, **k: None)
  assert not list(tmp_path.glob("*.json"))
  # On the command line, --only takes comma-separated prefixes as well as repeats.
  with pytest.raises(SystemExit):
    run.main(["--smoke", f"--out={tmp_path}", "--only=jax_train,jax_trian,", "--only=info"])
  assert "--only=jax_trian: no job id starts with it" in capsys.readouterr().err
  assert not list(tmp_path.glob("*.json"))


@pytest.mark.slow
def test_smoke_run_writes_every_section(tmp_path):
  # Its own devices and threads, and the suite's codegen (tests/suite_xla.py).
  env = dict(os.environ, XLA_FLAGS=suite_xla.fast_compile_only(os.environ["XLA_FLAGS"]))
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
                 "jax_train/unimodal_recipe/one/", "torch_train/bilinear/eager/",
                 "torch_train/einsum/eager/", "epoch"):
    row = next(r for k, r in rows.items() if k.startswith(prefix))
    st = row["samples_per_s"]
    assert st["n"] >= 1 and 0 < st["min"] <= st["median"] <= st["max"], (prefix, st)
  assert sec["flops"]["flops_per_sample"] > 0
  assert sec["matmul_peak"]["peak_float32_gflops"] > 0
  assert all(r["samples_per_s"]["median"] > 0 for r in sec["embed"])
  epochs = {r["id"]: r for r in sec["epoch"]["rows"]}
  assert epochs["epoch"]["mode"] == "streaming"  # "auto" on CPU, as in training
  assert epochs["epoch/scan"]["mode"] == "scan"
  for row in epochs.values():
    assert row["steps"] >= 1 and row["compile_s"] > 0 and row["evaluation_s"] > 0, row
    assert 0 < row["recipe"]["train_s"] < row["recipe"]["total_s"], row["recipe"]
  assert epochs["epoch/scan"]["evaluation_protocols"] is None  # timed once, on the main epoch
  protocols = epochs["epoch"]["evaluation_protocols"]  # each protocol's pass and evaluations
  assert protocols["rounds"] == 3
  # The warm evaluation of both protocols is the protocols' own (not timed a second time).
  assert epochs["epoch"]["evaluation_s"] == protocols["final_evaluation_s"]
  paired = protocols["rounds_s"]["embed_paired"]
  for key in ("embed_unimodal", "embed_both", "selection_evaluation", "unimodal_evaluation",
              "final_evaluation"):
    assert protocols[f"{key}_s"] > 0 and len(protocols["rounds_s"][key]) == 3, (key, protocols)
    # Each round's ratio to the same round's paired pass; their median, not a ratio of medians.
    ratios = [t / p for t, p in zip(protocols["rounds_s"][key], paired)]
    assert protocols[f"{key}_over_paired_pass"] == pytest.approx(np.median(ratios))
    assert protocols[f"{key}_over_paired_pass_range"] == pytest.approx([min(ratios),
                                                                       max(ratios)])
  uni = next(r for k, r in rows.items() if k.startswith("jax_train/unimodal_recipe/"))
  default_step = next(r for k, r in rows.items() if k.startswith("jax_train/float32/one/"))
  assert uni["flops_per_sample"] > default_step["flops_per_sample"]  # its own FLOPs
  prof = sec["profile"]
  assert "error" not in prof, prof
  assert prof["wall_s"]["median"] > 0 and prof["op_flops_per_step"] > 0
  cats = {c["category"]: c for c in prof["categories"]}
  assert {"matmul: bilinear", "matmul: other", "convolution", "elementwise"} <= set(cats)
  assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0)
  assert cats["matmul: bilinear"]["flops"] > 0 and cats["convolution"]["gflops"] > 0
  assert prof["ops"] and all(o["cpu_s"] >= 0 for o in prof["ops"])
  maps = {r["key"]: r["map"] for r in sec["map"]}
  assert set(maps) == {"ours", "ours_sort", "ours_count", "original", "numpy", "sklearn"}
  assert max(maps.values()) - min(maps.values()) < 1e-6, maps
  assert sec["map_scaling"] and sec["map_scaling"][0]["seconds"]["median"] > 0
  assert {t["target"] for t in sec["targets"]} == set(report.TARGETS)
  assert len(sec["ratios"]) == 2
  printed = proc.stdout
  assert "### Training step" in printed and "PyTorch eager, nn.Bilinear" in printed
  assert "JAX streamed epoch" in printed and "### Where the training step's time goes" in printed


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


def test_hlo_parse_classifies_ops_and_counts_flops():
  import jax
  import jax.numpy as jnp

  def f(a, b, x, w):
    conv = jax.lax.conv_general_dilated(x, w, (1,), "SAME",
                                        dimension_numbers=("NWC", "WIO", "NWC"))
    return jnp.tanh(a @ b).sum(0), jnp.sort(a, axis=1), conv

  args = (jnp.ones((32, 64)), jnp.ones((64, 48)), jnp.ones((4, 16, 8)), jnp.ones((3, 8, 5)))
  instrs, computations = hlo.parse_hlo(jax.jit(f).lower(*args).compile().as_text())
  entry = next(c for c in computations if c.startswith("main"))
  found = {}
  for name in computations[entry]:
    if instrs[name]["opcode"] not in ("parameter", "tuple", "get-tuple-element", "bitcast"):
      category, flops = hlo.classify_hlo(name, instrs, computations)
      found.setdefault(category, []).append(flops)
  assert max(found["matmul: other"]) == 2 * 32 * 64 * 48
  assert max(found["convolution"]) == 2 * 4 * 16 * 5 * 3 * 8
  assert "sort" in found


def test_repeat_and_stats():
  calls = []
  times = harness.repeat(lambda: calls.append(1), warmup=2, repeats=4)
  assert len(calls) == 6 and len(times) == 4
  # A budget stops after the first timed call, never before it.
  assert len(harness.repeat(lambda: None, warmup=0, repeats=5, budget_s=0.0)) == 1
  st = harness.stats([3.0, 1.0, 2.0])
  assert (st["median"], st["min"], st["max"], st["n"]) == (2.0, 1.0, 3.0, 3)
  assert harness.rates(10.0, [1.0, 2.0])["max"] == 10.0


def _fake_document():
  def st(x):
    return harness.stats([x, x * 0.9, x * 1.1])

  jobs = {
      "info": {}, "matmul_peak": {"peak_float32_gflops": 200.0, "peak_bfloat16_gflops": 600.0},
      "jax_train/float32/one/128": {"samples_per_s": st(150.0), "compile_s": 5.0,
                                    "flops_per_sample": 0.83e9, "host_peak_bytes": 2**30,
                                    "interleaved_peak": {"fraction_of_peak": st(0.7)}},
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


def _fake_epoch_job(protocols=None):
  recipe = {"epochs": 40, "examples": 22000, "steps_per_epoch": 171, "epoch_s": 150.0,
            "scaled_from_steps": None, "evaluations": 8, "evaluation_s": 10.0,
            "evaluation_examples": 5621, "train_s": 6006.0, "total_s": 6060.0, "includes": "x"}
  return {"mode": "streaming", "batch_size": 128, "num_examples": 22000, "steps": 171,
          "epoch_s": harness.stats([150.0]), "samples_per_s": harness.stats([146.0]),
          "compile_s": 6.0, "recipe": recipe,
          "evaluation": {"evaluate_s": 10.0, "embed_s": 3.0, "first_call_s": 14.0,
                         "examples": 5621, "protocols": protocols}}


def test_report_epoch_and_profile_sections():
  doc = _fake_document()
  doc["sections"] = report.sections(doc)
  assert doc["sections"]["epoch"]["rows"] == [] and "error" in doc["sections"]["profile"]
  report_md.markdown(doc)  # renders without them
  st = harness.stats
  doc["jobs"]["epoch"] = _fake_epoch_job()
  cat = {"category": "matmul: bilinear", "ops": 6, "cpu_s": 1.0, "elapsed_s": 0.55,
         "share": 1.0, "flops": 77e9, "gflops": 140.0, "gflops_per_thread": 77.0}
  op = {"op": "dot.57", "category": "matmul: bilinear", "source": "bwd fusion/mfa/bilinear",
        "shape": "f32[65536,256]", "cpu_s": 0.25, "elapsed_s": 0.2, "share": 0.25,
        "flops": 12.9e9, "gflops": 64.0, "gflops_per_thread": 51.0}
  doc["jobs"]["profile"] = {"batch_size": 128, "steps_traced": 5, "wall_s": st([0.88]),
                            "traced_wall_s": st([0.9]), "span_s": st([0.88]),
                            "cpu_s": st([1.7]), "idle_core_s": st([0.03]), "cores": 2,
                            "ops_per_step": 1880.0, "op_flops_per_step": 106e9,
                            "flops_per_step": 105e9, "categories": [cat], "ops": [op]}
  doc["sections"] = report.sections(doc)
  (row,) = doc["sections"]["epoch"]["rows"]
  assert row["name"] == report.EPOCH_NAMES["streaming"] and row["evaluation_s"] == 10.0
  pytorch = doc["sections"]["epoch"]["pytorch_recipe_s_extrapolated"]
  assert pytorch["PyTorch eager, einsum bilinear"] == pytest.approx(40 * 171 * 128 / 100.0)
  text = report_md.markdown(doc)
  assert "JAX streamed epoch" in text and "| 101 |" in text  # 6060 s = 101 min
  assert "`dot.57`" in text and "bwd fusion/mfa/bilinear" in text


def test_report_targets_ratios_and_failed_rows():
  doc = _fake_document()
  doc["jobs"]["jax_train/bfloat16/one/128"] = {"samples_per_s": harness.stats([120.0]),
                                               "compile_s": 7.0, "flops_per_sample": 0.83e9}
  seconds = {"embed_unimodal": 18.0, "embed_both": 22.0, "selection_evaluation": 10.5,
             "unimodal_evaluation": 19.0, "final_evaluation": 23.0}
  protocols = {"rounds": 1, "embed_paired_s": 10.0,
               **{f"{k}_s": v for k, v in seconds.items()},
               **{f"{k}_over_paired_pass": v / 10.0 for k, v in seconds.items()}}
  doc["jobs"]["epoch"] = _fake_epoch_job(protocols)
  doc["sections"] = report.sections(doc)
  sec = doc["sections"]
  targets = {t["target"]: t for t in sec["targets"]}
  # bf16 must beat float32; an evaluation must cost at most its threshold.
  assert targets["bfloat16_over_float32"]["measured"] == pytest.approx(120 / 150)
  assert targets["bfloat16_over_float32"]["met"] is False
  selection = targets["selection_evaluation_over_paired_pass"]
  assert selection["direction"] == "at most" and selection["met"] is True
  assert selection["shortfall_percent"] is None
  unimodal = targets["unimodal_evaluation_over_paired_pass"]
  assert unimodal["met"] is False and unimodal["shortfall_percent"] == pytest.approx(
      100 * (1.9 / 1.8 - 1))
  assert targets["jax_samples_per_s"]["met"] is False
  assert targets["jax_samples_per_s"]["shortfall_percent"] == pytest.approx(100 * (1 - 150 / 180))
  assert targets["speedup_vs_original"]["measured"] == pytest.approx(30.0)
  assert targets["speedup_vs_best_pytorch"]["measured"] == pytest.approx(1.5)
  assert targets["speedup_vs_best_pytorch"]["met"] is True
  assert targets["map_speedup_vs_original"]["measured"] == pytest.approx(90.0)
  assert targets["fraction_of_matmul_peak"]["measured"] == pytest.approx(150 * 0.83 / 200)
  interleaved = targets["fraction_of_matmul_peak_interleaved"]
  assert interleaved["measured"] == pytest.approx(0.7) and interleaved["met"] is False
  assert sorted(r["ratio"] for r in sec["ratios"]) == pytest.approx([1.5, 30.0])
  text = report_md.markdown(doc)
  assert "RuntimeError: no compiler" in text  # a failed variant is a row, not a gap
  assert "missed by" in text and "17 %" in text and "| ≤ 1.8 | 1.9 | no | 6 % |" in text
  assert np.isclose(sec["flops"]["flops_per_sample"], 0.83e9)


def test_the_interleaved_peak_divides_each_rounds_rate_by_that_rounds_best_product():
  from benchmarks import cases_train
  slept = []

  def run():  # a "step" of 0.01 GFLOP that takes at least 20 ms
    time.sleep(0.02)
    slept.append(1)

  out = cases_train._interleaved_peak(run, 0.01e9, {"n": 16, "bilinear_shape": [8, 32, 4],
                                                     "rounds": 3}, "float32")
  assert out["rounds"] == 3 and len(slept) == 3
  assert 0 < out["gflops"]["max"] <= 0.5  # 0.01 GFLOP in >= 20 ms
  assert out["peak_gflops"]["min"] > 0
  ratios = [g / p for g, p in zip(out["gflops"]["values"], out["peak_gflops"]["values"])]
  np.testing.assert_allclose(out["fraction_of_peak"]["values"], ratios, rtol=1e-12)


def test_scan_profile_names_the_costliest_ops():
  proc = subprocess.run([sys.executable, "-m", "benchmarks.scan_profile", "--smoke", "--steps",
                         "1", "--batch-size", "8", "--top", "3"], cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[0].startswith("cpu: 1 steps of batch 8") and "per step" in lines[0], lines
  assert len(lines) == 2 + 3 and all(float(line.split()[0]) >= 0 for line in lines[2:]), lines


def test_ops_are_traced_back_to_model_layers_also_inside_loops():
  step = "jit(step)/transpose(jvp(DSF3N))/fusion/mfa/bilinear/dot_general"
  loop = "jit(epoch_fn)/while/body/closed_call/jvp(DSF3N)/audio_fine_grained/conv7_3/conv"
  assert op_trace.layer_of(step) == "fusion/mfa/bilinear"
  assert op_trace.short_op_name(step) == "bwd fusion/mfa/bilinear/dot_general"
  assert op_trace.layer_of(loop) == "audio_fine_grained/conv7_3"
  assert op_trace.short_op_name(loop) == "fwd audio_fine_grained/conv7_3/conv"
  assert op_trace.layer_of("jit(step)/while/body/add").startswith("(outside the model")
  assert op_trace.layer_of("") == "(no source recorded)"


@pytest.mark.parametrize("kind", ["pickle", "object_array", "hdf5"])
def test_torch_weights_file_is_read_without_pickles(bad_npz_files, assert_refused_npz, kind):
  pytest.importorskip("torch")
  from dsf3n_jax.datasets import DataValidationError
  path = bad_npz_files[kind]
  with pytest.raises(DataValidationError) as e:
    cases_torch.torch_model({"weights": str(path)}, einsum=False, device="cpu")
  assert_refused_npz(str(e.value), path)


def test_the_accelerator_check_passes_shellcheck_and_names_its_usage():
  script = os.path.join(REPO, "benchmarks", "accelerator_check.sh")
  subprocess.run(["bash", "-n", script], check=True)
  shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable),
                                                         "shellcheck")
  proc = subprocess.run([shellcheck, script], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout
  proc = subprocess.run(["bash", script], capture_output=True, text=True)
  assert proc.returncode != 0 and "usage:" in proc.stderr, proc.stderr
  pins = [line for line in open(os.path.join(REPO, "benchmarks", "accelerator_requirements.txt"))
          if line.strip() and not line.startswith("#")]
  names = {line.split("==")[0].lower().replace("_", "-") for line in pins}
  assert all(len(line.strip().split("==")) == 2 for line in pins), pins
  assert {"tensorflow-datasets", "ml-collections", "array-record", "tensorboardx"} <= names


def test_the_search_benchmark_writes_every_row(tmp_path):
  from benchmarks import search as search_bench
  assert search_bench.main(["--sizes=300,1000", f"--out={tmp_path}"]) == 0
  (doc_path,) = tmp_path.glob("search-*.json")
  doc = json.loads(doc_path.read_text())
  assert [r["items"] for r in doc["rows"]] == [300, 1000]
  for row in doc["rows"]:
    assert row["ids_equal_numpy_fraction"] == 1.0 and row["approximate_recall_at_k"] == 1.0
    assert row["exact_s"] > 0 and 0 < row["roofline_fraction"] and row["speedup_over_numpy"] > 0
  assert doc["build"]["build_from_embeddings_items_per_s"] > 0
  assert "| 1,000 |" in (tmp_path / doc_path.name.replace(".json", ".md")).read_text()


def test_the_init_compile_benchmark_compiles_both_initialisers_and_checks_their_bits(tmp_path):
  import jax

  from benchmarks import init_compile
  before = jax.config.jax_enable_compilation_cache
  assert init_compile.main(["--model=tiny", "--rounds=1", f"--out={tmp_path}"]) == 0
  assert jax.config.jax_enable_compilation_cache == before  # put back for the other tests
  (doc_path,) = tmp_path.glob("init-compile-*.json")
  (row,) = json.loads(doc_path.read_text())["rows"]
  assert (row["model"], row["parameters"]) == ("tiny", 74)  # its bits were compared
  for name in ("one_hash_each", "fused"):
    assert all(row[name][k]["median"] > 0 for k in ("compile_s", "compile_cpu_s", "run_s"))
  assert "| tiny | 74 |" in doc_path.with_suffix(".md").read_text()


def test_the_restore_benchmark_times_the_three_ways_and_checks_they_read_the_same(tmp_path):
  from benchmarks import restore_time
  assert restore_time.main(["--configs=tiny", "--rounds=1", f"--out={tmp_path}"]) == 0
  (doc_path,) = tmp_path.glob("restore-time-*.json")
  (row,) = json.loads(doc_path.read_text())["rows"]  # the bits were compared in the run
  assert (row["model"], row["arrays"], row["devices"]) == ("tiny", 231, 8)
  assert all(row[k]["median"] > 0 for k in restore_time.KINDS)
  assert "| tiny | 231 | 2.7 | 8 |" in doc_path.with_suffix(".md").read_text()


def test_the_bilinear_benchmark_times_each_block_size(tmp_path):
  from benchmarks import bilinear
  rows = bilinear.measure(8, [0, 4], dim=8, repeats=1)
  assert [r["block"] for r in rows] == [0, 4]
  assert all(r["forward_ms"] > 0 and r["forward_backward_gflops"] > 0 for r in rows)


def test_the_sweep_throughput_benchmark_times_k_configurations_both_ways(tmp_path):
  from benchmarks import seeds as seeds_bench
  # The smoke model: what is checked is the benchmark's machinery, which compiles 3 programs
  # of the :unimodal recipe (40 s of CPU with --model=tiny, 25 s with it).
  assert seeds_bench.main(["--members=configs", "--model=smoke", "--k=2", "--steps=1",
                           "--batch_size=8", f"--out={tmp_path}"]) == 0
  (doc_path,) = tmp_path.glob("sweep-*.json")
  (row,) = json.loads(doc_path.read_text())["rows"]
  assert row["members"] == "configs" and row["compile_s"]["single_programs"] == 2
  assert row["together_samples_per_s"] > 0 and row["one_by_one_samples_per_s"] > 0
  assert "K configurations together" in doc_path.with_suffix(".md").read_text()


_TWO_TESTS = '''
def test_compiles():
  import jax
  import jax.numpy as jnp
  jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()


def test_compiles_nothing():
  assert sum([1, 1]) == 2


def test_starts_a_subprocess():
  import subprocess
  import sys
  subprocess.run([sys.executable, "-c", "sum(range(2 * 10**7))"], check=True)
'''


def test_suite_time_puts_each_compile_with_its_test_and_its_program(tmp_path):
  from benchmarks import suite_time

  (tmp_path / "test_two.py").write_text(_TWO_TESTS)
  out = tmp_path / "out"
  assert suite_time.main(["--workers=0", f"--out={out}", "--", str(tmp_path / "test_two.py"),
                          "-p", "no:cacheprovider"]) == 0
  (doc_path,) = out.glob("suite-*.json")
  doc = json.loads(doc_path.read_text())
  tests = {k.rsplit("::", 1)[-1]: v for k, v in doc["tests"].items()}
  compiles, nothing = tests["test_compiles"], tests["test_compiles_nothing"]
  started = tests["test_starts_a_subprocess"]
  assert compiles["compiles"] >= 1 and compiles["compile_s"] > 0 and compiles["trace_s"] > 0
  assert nothing.get("compiles", 0) == 0 and nothing["duration_s"] >= 0
  assert compiles["duration_s"] >= compiles["compile_s"] and compiles["cpu_s"] > 0
  assert any("<lambda>" in name for name in doc["programs"]), doc["programs"]
  # The subprocess's CPU time is its test's alone.
  assert started["children_cpu_s"] > 0.1, started
  assert compiles["children_cpu_s"] < 0.05 and nothing["children_cpu_s"] < 0.05
  (compiled_by,) = [k for k in doc["test_programs"] if k.endswith("::test_compiles")]
  assert any("<lambda>" in name for name in doc["test_programs"][compiled_by])
  assert doc["summary"]["tests"] == 3 and doc["returncode"] == 0
  assert "| test | duration (s) | CPU (s) | subprocess CPU (s)" in doc_path.with_suffix(
      ".md").read_text()
