"""benchmarks.paper: the paper's tables on synthetic data in quick mode, end to end."""

import json
import pathlib

import numpy as np
import pytest

from benchmarks import paper
from dsf3n_jax import sweep

# The rows the end-to-end test runs: two baselines, the full model and one ablation (the
# MFA-less path), and the swept row (sweep and refit). Every other row is a config of the same
# code (test_ablation_configs_switch_exactly_one_thing_each); the ordering over all of them is
# test_the_papers_ordering_counts_each_component_over_the_pairs_that_differ_only_in_it.
END_TO_END_ROWS = ("linear_cca", "cluster_cca", "full", "swept_recipe")


@pytest.mark.slow
def test_quick_tables_on_synthetic_have_their_rows_and_a_rerun_keeps_them(tmp_path,
                                                                          monkeypatch):
  # Figure 3's planes by a projection in place of t-SNE (seconds each here; t-SNE is
  # test_visualize's): this test is of which rows, states and files the figure has.
  from dsf3n_jax import visualize

  def projection(visual, audio, *, seed=0, kind="embedding"):
    del seed, kind
    return tuple(np.asarray(x, np.float64)[:, :2] for x in (visual, audio))

  monkeypatch.setattr(visualize, "joint_tsne", projection)
  logs = []
  # One epoch (quick's budget is two): the rows, protocols and reruns are what is tested here.
  doc = paper.run("synthetic", seeds=[0, 1], quick=True, epochs=1, out_dir=tmp_path,
                  log=logs.append, command="test", only=END_TO_END_ROWS)
  on_disk = json.loads((tmp_path / "paper-synthetic-quick.json").read_text())
  assert on_disk["rows"] == json.loads(json.dumps(doc["rows"], default=str))
  rows = {r["key"]: r for r in on_disk["rows"]}
  assert list(rows) == list(END_TO_END_ROWS)  # the planned order
  for key, row in rows.items():
    assert row["error"] is None, (key, row["error"])
    protocols = ("unimodal",) if key in paper.BASELINES else ("paired", "unimodal")
    assert tuple(sorted(row["protocols"])) == tuple(sorted(protocols)), key
    for p in protocols:
      summary = row["protocols"][p]
      assert summary["seeds_used"] == 2 and len(summary["per_seed"]) == 2, (key, p)
      for stat in ("mean", "std"):
        values = summary[stat]
        assert set(values) == {"audio_to_visual", "visual_to_audio", "average"}
        assert all(0.0 <= v <= 1.0 for v in values.values()), (key, p, stat, values)
      per_seed = [s["average"] for s in summary["per_seed"]]
      assert summary["mean"]["average"] == pytest.approx(sum(per_seed) / 2)
  assert rows["full"]["config"]["loss"]["terms"]["id"] == 1.0
  # The swept row: the sweep's configurations, the chosen one's test numbers.
  swept = rows["swept_recipe"]
  assert [c["overrides"] for c in swept["sweep"]] == paper.swept_configurations(True)
  assert swept["chosen"]["overrides"] in paper.swept_configurations(True)
  assert "validation" in swept["chosen"]["selected_on"]
  margin = swept["chosen"]["margin"]  # over the runner-up, in the report's words
  assert margin["seeds"] == 2 and 0 <= margin["preferred_by"] <= 2
  assert swept["sweep"][margin["runner_up"]]["overrides"] != swept["chosen"]["overrides"]
  assert f"by {margin['mean']:+.4f} (per seed" in (tmp_path / "paper-synthetic-quick.md"
                                                   ).read_text()
  # Its test numbers are the refit's (train + validation, final states); the selected
  # states' test is kept beside them.
  assert swept["chosen"]["refit"] is True
  assert sorted(swept["selection_test"]) == ["paired", "unimodal"]
  assert swept["selection_test"]["unimodal"]["seeds_used"] == 2
  assert "trained that configuration again on train + validation" in (
      tmp_path / "paper-synthetic-quick.md").read_text()
  # The paper's ordering over the one ablation row run: the full model is the best of those
  # run, and no pair of rows differs in one component (the ordering over several rows: its own
  # test; the ablation switches: test_ablation_configs_switch_exactly_one_thing_each).
  for p in ("paired", "unimodal"):
    assert on_disk["ordering"][p] == {"full_is_best": True, "best": "full",
                                      "helps": {"dis": [0, 0], "intra": [0, 0], "mfa": [0, 0]}}
  fig = on_disk["figure_3"]
  assert fig["seed"] in (0, 1) and all((tmp_path / f).stat().st_size > 1000
                                       for f in fig["files"].values())
  md = (tmp_path / "paper-synthetic-quick.md").read_text()
  assert "## Table I/II" in md and "## Table III/IV" in md and "± " in md
  assert md.count("\n| ") >= (1 + 4) + (1 + 1)  # each table's header and rows

  # A rerun keeps every unchanged row and reruns a row whose config changed (here: its saved
  # fingerprint no longer matches); --only leaves the other rows' results in the report.
  stale = json.loads((tmp_path / "paper-synthetic-quick.json").read_text())
  stale["rows"][0]["fingerprint"] = "changed"
  (tmp_path / "paper-synthetic-quick.json").write_text(json.dumps(stale))
  logs.clear()
  again = paper.run("synthetic", seeds=[0, 1], quick=True, epochs=1, out_dir=tmp_path,
                    log=logs.append, only=["linear_cca", "cluster_cca", "full"])
  assert [r["key"] for r in again["rows"]] == [r["key"] for r in doc["rows"]]
  assert any(line.startswith("linear_cca: unimodal") for line in logs), logs  # rerun
  assert any(line.startswith("cluster_cca: unchanged") for line in logs), logs
  assert any(line.startswith("full: unchanged") for line in logs), logs
  rerun = {r["key"]: r for r in again["rows"]}
  assert rerun["linear_cca"]["fingerprint"] == rows["linear_cca"]["fingerprint"]
  assert rerun["full"] == rows["full"] and rerun["swept_recipe"] == rows["swept_recipe"]
  assert again["figure_3"] == fig


def test_a_report_another_run_took_over_gets_nothing_more_written(tmp_path, monkeypatch):
  """A run whose lease lapsed while a row ran (``_run_row`` stands in for it) and whose report
  another run took over: a ``WorkdirError`` naming that run, no report written."""
  import time

  from dsf3n_jax.training import workdir as workdir_lib
  from tests.test_loop import _OTHER_RUN, _take_over, renewing_fast
  locks, other = [], {**_OTHER_RUN, "renewed": time.time()}

  def run_row(row, *args, **kwargs):
    _take_over(locks[0], other)
    return {"key": row.key, "error": None, "protocols": {}}

  monkeypatch.setattr(paper, "WorkdirLock", renewing_fast(locks))
  monkeypatch.setattr(paper, "_run_row", run_row)
  with pytest.raises(workdir_lib.WorkdirError) as stopped:
    paper.run("synthetic", seeds=[0], quick=True, out_dir=tmp_path, log=lambda m: None,
              only=["linear_cca"])
  lock = tmp_path / ".paper-synthetic-quick.lock"
  assert str(stopped.value).startswith(f"--out={tmp_path}: another run took it over")
  assert str(stopped.value).endswith(
      f"pid 4242 on host other-host (started 2030-01-02 03:04:05) holds {lock} now; this run "
      "stopped after row linear_cca, before writing paper-synthetic-quick.json, and left that "
      "run's lock as it is")
  assert sorted(p.name for p in tmp_path.iterdir()) == [lock.name]
  assert json.loads(lock.read_text()) == other


def test_the_papers_ordering_counts_each_component_over_the_pairs_that_differ_only_in_it():
  from benchmarks import paper_report

  def doc(score, *, drop=(), failed=()):
    rows = []
    for a in paper_report.ABLATIONS:
      if a.key in drop:
        continue
      means = {p: {"average": score(p, a)} for p in paper_report.PROTOCOLS}
      rows.append({"key": a.key, "error": "boom" if a.key in failed else None,
                   "protocols": {p: {"mean": m} for p, m in means.items()}})
    return {"rows": [{"key": "linear_cca", "error": None}, *rows]}

  # Paired: every component adds; unimodal: MFA takes away, so the best row lacks it.
  def score(p, a):
    return 0.5 + 0.1 * a.dis + 0.05 * a.intra + (0.2 if p == "paired" else -0.2) * a.mfa

  out = paper_report.ordering(doc(score))
  assert out["paired"] == {"full_is_best": True, "best": "full",
                           "helps": {"dis": [3, 3], "intra": [3, 3], "mfa": [3, 3]}}
  assert out["unimodal"] == {"full_is_best": False, "best": "no_mfa",
                             "helps": {"dis": [3, 3], "intra": [3, 3], "mfa": [0, 3]}}
  # A row that failed counts as absent: its pairs go; without the full model, no verdict.
  out = paper_report.ordering(doc(score, failed=("full",)))
  assert out["paired"]["full_is_best"] is None and out["paired"]["best"] == "no_intra"
  assert out["paired"]["helps"] == {"dis": [2, 2], "intra": [2, 2], "mfa": [2, 2]}
  assert paper_report.ordering(doc(score, drop=[a.key for a in paper_report.ABLATIONS])) == {}


def test_a_changed_config_or_seed_list_changes_a_rows_fingerprint():
  budget = dict(quick=True, epochs=None, overrides={})
  row = paper.plan_rows("synthetic", **budget)[len(paper.BASELINES)]
  changed = paper.plan_rows("synthetic", **{**budget, "overrides": {"optim.lr": 2e-3}})
  fp = paper.fingerprint(row, [0, 1], True)
  assert fp == paper.fingerprint(paper.plan_rows("synthetic", **budget)[len(paper.BASELINES)],
                                 [0, 1], True)
  assert fp != paper.fingerprint(changed[len(paper.BASELINES)], [0, 1], True)
  assert fp != paper.fingerprint(row, [0, 1, 2], True)


def test_the_swept_row_takes_another_search_space_and_keeps_the_grids_epochs():
  budget = dict(quick=False, epochs=None, overrides={})
  swept = paper.plan_rows("synthetic", **budget)[-1]
  assert swept.key == "swept_recipe" and "default sweep" in swept.name
  assert swept.sweep == sweep.parse_sweep("default")  # the default sweep sets its own epochs
  assert {c["num_epochs"] for c in swept.sweep} == {60}
  other = paper.plan_rows("synthetic", sweep="optim.lr=1e-3,2e-3;num_epochs=9", **budget)[-1]
  assert "sweep optim.lr=1e-3,2e-3;num_epochs=9" in other.name
  assert other.sweep == [{"optim.lr": 1e-3, "num_epochs": 9}, {"optim.lr": 2e-3, "num_epochs": 9}]
  assert paper.fingerprint(other, [0], False) != paper.fingerprint(swept, [0], False)
  # --epochs (and quick mode) hold every row at the grid's epochs, the swept one too.
  held = paper.plan_rows("synthetic", sweep="optim.lr=1e-3;num_epochs=9",
                         **{**budget, "epochs": 4})[-1]
  assert held.sweep == [{"optim.lr": 1e-3}] and held.config.num_epochs == 4
  with pytest.raises(SystemExit, match="PATH=V1,V2"):
    paper.main(["--data=synthetic", "--sweep=optim.lr", "--only=swept_recipe"])


def test_only_names_every_unknown_row_before_anything_runs(tmp_path):
  with pytest.raises(SystemExit, match=r"--only=semantic_mpl: no such row or table; rows: "
                                       r"linear_cca, .*semantic_mlp.*; tables: comparison"):
    paper.run("synthetic", seeds=[0], quick=True, epochs=1, out_dir=tmp_path,
              only=["swept_recipe", "semantic_mpl", "ablation"])
  assert not list(tmp_path.iterdir())
  # On the command line, --only takes comma-separated names as well as repeats.
  with pytest.raises(SystemExit, match=r"--only=semantic_mpl,deep: no such row or table"):
    paper.main(["--data=synthetic", "--quick", f"--out={tmp_path}",
                "--only=swept_recipe,semantic_mpl", "--only=ablation,deep,"])
  assert not list(tmp_path.iterdir())


def test_a_report_of_some_rows_leaves_out_the_tables_it_has_no_rows_of():
  from benchmarks import paper_report
  doc = json.loads((paper.RESULTS / "paper-split_digits.json").read_text())
  assert {r["table"] for r in doc["rows"]} == {"comparison"}
  md = paper_report.markdown(doc)
  assert "## Table I/II" in md and "| semantic matching, MLP | 0.899 ± 0.006 |" in md
  assert "Table III/IV" not in md
  assert md == (paper.RESULTS / "paper-split_digits.md").read_text()  # the committed report
  swept = next(r for r in doc["rows"] if r["key"] == "swept_recipe")
  ablation_only = {**doc, "rows": [{**swept, "key": "no_mfa", "table": "ablation"}]}
  md = paper_report.markdown(ablation_only)
  assert "## Table III/IV" in md and "Table I/II" not in md


def test_set_values_are_parsed_and_unknown_fields_refused():
  assert paper.parse_set(["optim.lr=3e-4", "model.fusion_kw.num_stages=0", "data.name=vegas"]) == {
      "optim.lr": 3e-4, "model.fusion_kw.num_stages": 0, "data.name": "vegas"}
  with pytest.raises(SystemExit, match="FIELD=VALUE"):
    paper.parse_set(["optim.lr"])
  with pytest.raises(SystemExit, match="no field 'learning_rate'"):
    paper.base_config("synthetic", unimodal=False, quick=True, epochs=None,
                      overrides={"optim.learning_rate": 1.0})


def test_ablation_configs_switch_exactly_one_thing_each():
  base = paper.base_config("synthetic", unimodal=False, quick=True, epochs=3, overrides={})
  assert base.num_epochs == 3
  for a in paper.ABLATIONS:
    c = paper.ablation_config(base, a)
    assert (c.loss.terms.id > 0, c.loss.terms.center > 0, c.model.fusion_kw.num_stages > 0) == (
        a.dis, a.intra, a.mfa)
    assert c.loss.terms.pair == base.loss.terms.pair  # the pair term stays in every row
  assert len({(a.dis, a.intra, a.mfa) for a in paper.ABLATIONS}) == 7


_WRITER = """
import pathlib, sys
from benchmarks import accuracy
out, who = pathlib.Path(sys.argv[1]), sys.argv[2]
for i in range(150):
  accuracy.write_files(out, "paper-x", {"writer": who, "i": i}, f"{who} {i}\\n")
"""


def test_two_processes_writing_one_report_never_collide(tmp_path):
  """Each write has its own temporary name: no rename of another writer's file fails, and
  the report is always one writer's whole version (before: a fixed NAME.json.tmp, 25 of 600
  writes failed with FileNotFoundError)."""
  import json
  import subprocess
  import sys
  procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), who],
                            cwd=pathlib.Path(__file__).resolve().parents[1],
                            stderr=subprocess.PIPE, text=True) for who in ("a", "b")]
  for proc in procs:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
  doc = json.loads((tmp_path / "paper-x.json").read_text())
  assert doc["writer"] in ("a", "b") and doc["i"] == 149
  assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_a_second_run_into_the_same_report_is_refused(tmp_path):
  from dsf3n_jax.training.workdir import WorkdirError, WorkdirLock
  held = WorkdirLock(tmp_path, name=".paper-synthetic-quick.lock", flag="--out")
  held.acquire()
  try:
    with pytest.raises(WorkdirError, match=r"^--out=.* is in use by pid \d+ on host"):
      paper.run("synthetic", seeds=[0], quick=True, out_dir=tmp_path, epochs=1,
                only=["full"], figures=False)
  finally:
    held.release()
  assert not (tmp_path / "paper-synthetic-quick.json").exists()  # refused before any row
