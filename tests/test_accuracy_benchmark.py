"""Tests of the accuracy benchmark (benchmarks/accuracy.py): the quick run end to end, CCA, rows."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import accuracy, baselines
from tests import suite_xla

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = {("cca", "unimodal"), ("semantic_linear", "unimodal"), ("semantic_mlp", "unimodal"),
            ("dsf3n_paper", "paired"), ("dsf3n_paper", "unimodal"),
            ("dsf3n_unimodal", "paired"), ("dsf3n_unimodal", "unimodal")}


@pytest.mark.slow
def test_quick_run_on_synthetic_writes_every_row(tmp_path):
  # One CPU device, and the suite's codegen (tests/suite_xla.py).
  env = dict(os.environ, XLA_FLAGS=suite_xla.fast_compile_only(os.environ["XLA_FLAGS"]))
  proc = subprocess.run([sys.executable, "-m", "benchmarks.accuracy", "--data=synthetic",
                         "--quick", f"--out={tmp_path}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads((tmp_path / "accuracy-synthetic-quick.json").read_text())
  md = (tmp_path / "accuracy-synthetic-quick.md").read_text()
  assert doc["data"] == "synthetic" and doc["report_split"] == "test" and doc["quick"]
  for key in ("cpu_model", "cores", "date"):
    assert doc["machine"][key], key
  assert doc["accelerator"]["jax_backend"] and doc["versions"]["jax"]
  rows = {(r["method"], r["protocol"]): r for r in doc["rows"]}
  assert set(rows) == EXPECTED and len(doc["rows"]) == len(EXPECTED)
  for (method, protocol), r in rows.items():
    assert r["config"], (method, r)
    assert r["error"] is None, (method, r.get("traceback"))
    assert r["train_s"] > 0, r
    values = [r[k] for k in accuracy.DIRECTIONS]
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values), r
    assert r["average"] == pytest.approx((values[0] + values[1]) / 2), r
    assert f"| {r['name']} | {protocol} |" in md
  for method in ("dsf3n_paper", "dsf3n_unimodal"):
    details = rows[(method, "paired")]["details"]
    assert details["best"]["epoch"] >= 1 and details["best"]["selected_on"], details
  # The quick run's one epoch of the tiny model is a run of the pipeline, not of learning
  # (about chance here); that DSF3N learns is test_train's (synthetic and fsdd_digits).
  assert rows[("semantic_mlp", "unimodal")]["average"] > doc["chance_map"] + 0.2, doc
  assert "**test** split" in md and "Selection:" in md and "Machine:" in md


def test_linear_cca_finds_the_shared_directions():
  rng = np.random.default_rng(0)
  z = rng.standard_normal((500, 3))
  x = np.concatenate([z, rng.standard_normal((500, 20))], 1) @ rng.standard_normal((23, 23))
  y = np.concatenate([z, rng.standard_normal((500, 7))], 1) @ rng.standard_normal((10, 10))
  mx, px, my, py, corr = baselines.linear_cca(x, y, 5, 1e-6)
  assert np.all(corr[:3] > 0.99) and np.all(corr[3:] < 0.4), corr
  u, v = (x - mx) @ px, (y - my) @ py
  np.testing.assert_allclose(np.cov(u.T, bias=True), np.eye(5), atol=1e-4)  # whitened
  np.testing.assert_allclose(np.mean(u * v, 0), corr, atol=1e-6)


def test_configs_of_the_dsf3n_rows():
  ds = accuracy.Dataset("synthetic", None, "synthetic")
  config, text = accuracy.dsf3n_config(ds, "paper", quick=True, seed=3)
  synthetic = accuracy.load_config("synthetic", "runlocal,tiny")
  assert config.data.to_dict() == synthetic.data.to_dict() and config.seed == 3
  assert config.num_epochs == accuracy.QUICK_EPOCHS and text.endswith("; num_epochs=1")
  assert config.optim.lr == accuracy.load_config("default", "").optim.lr  # the paper's
  assert text.startswith("configs/default.py:runlocal,tiny with config.data of configs/")
  f = accuracy.Dataset("digits", "/data/digits.npz", "paired_features")
  assert accuracy.dsf3n_config(f, "unimodal", quick=False, seed=None) == (
      None, "configs/paired_features.py:unimodal with data.path=/data/digits.npz")


def test_a_failing_row_is_recorded_and_rendered(monkeypatch):
  def boom(ctx):
    raise ValueError("--config variant 'unimodal' unknown")

  monkeypatch.setitem(accuracy.METHODS, "dsf3n_unimodal",
                      accuracy.METHODS["dsf3n_unimodal"]._replace(run=boom))
  ctx = accuracy.Context(accuracy.Dataset("synthetic", None, "synthetic"), True, 0, {})
  rows = accuracy.run_method("dsf3n_unimodal", ctx)
  assert [r["protocol"] for r in rows] == ["paired", "unimodal"]
  assert all(r["error"].startswith("ValueError: --config variant") and r["average"] is None
             for r in rows)
  assert rows[0]["config"] == "configs/synthetic.py:unimodal,runlocal,tiny; num_epochs=1"
  doc = {"data": "synthetic", "quick": True, "data_path": None, "train_examples": 230,
         "test_examples": 128, "num_classes": 10, "metric": "mAP", "chance_map": 0.12,
         "seed": 0, "started": "today", "wall_s": 1.0, "command": "python -m ...",
         "machine": {"cpu_model": "cpu", "cores": 2, "usable_cores": 2, "load_average": None},
         "accelerator": {"jax_backend": "cpu", "jax_devices": 1, "jax_device_kind": "cpu"},
         "rows": rows}
  md = accuracy.markdown(doc)
  assert "| DSF3N, unimodal recipe | paired | failed |  |  |" in md
  assert "- DSF3N, unimodal recipe failed: ValueError: --config variant 'unimodal'" in md


def test_protocols_read_from_the_training_results():
  final = {"map_audio_to_visual": 0.5, "map_visual_to_audio": 0.7, "map_average": 0.6}
  paired = accuracy._protocol_row(final, "paired")
  assert (paired["audio_to_visual"], paired["average"], "note" in paired) == (0.5, 0.6, False)
  unimodal = accuracy._protocol_row(final, "unimodal")  # a train.py without unimodal_map_*
  assert unimodal["average"] is None and "unimodal_map_" in unimodal["note"]
  best = accuracy._best({"best": {"epoch": 2, "selected_on": "validation", "map_average": 0.6,
                                  "test": final}})
  assert (best["epoch"], best["metric"], best["value"]) == (2, "map_average", 0.6)
  assert best["test"]["paired"]["visual_to_audio"] == 0.7 and "validation" not in best
