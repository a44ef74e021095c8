"""Sweeps (dsf3n_jax.sweep): configurations differing in traced hyper-parameters train as one
program, each member as its configuration alone; the choice is made on validation; the
outputs (table, config file, run) are usable; a rerun resumes."""

import copy
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import paired_features
from dsf3n_jax import losses, sweep
from dsf3n_jax.training import restore
from dsf3n_jax.training import run as run_lib
from dsf3n_jax.training import seeds as seeds_lib
from dsf3n_jax.training import steps as steps_lib
from tests.test_seeds import _one_by_one
from tests.test_train import REPO, tiny_config

SPEC = ("optim.lr=1e-3,3e-3;model.partner_dropout=0.3;loss.unimodal_weight=1.0;"
        "loss.terms.distill_class=0.0;loss.unimodal_terms.distill_class=0.0,0.5")


def _base(**overrides):
  config = tiny_config(**{"data.validation_fraction": 0.25, "num_epochs": 2,
                          "selection_metric": "unimodal_map_average", **overrides})
  config.unlock()
  return config


def test_each_member_of_a_group_trains_as_its_configuration_alone():
  # Two configurations that differ in every traced kind of value: learning rate, weight
  # decay, partner dropout, input noise, the unimodal weight and a loss term's weight. In
  # float64: in
  # float32, Adam turns the rounding of gradients that are ~0 (the attention keys' biases)
  # into steps of +-lr, which a vmapped product (another summation order) flips.
  with jax.enable_x64(True):
    base = _base(num_epochs=1, **{"optim.weight_decay": 1e-3, "model.partner_dropout": 0.5,
                                  "model.input_noise": 0.5, "loss.unimodal_weight": 1.0,
                                  "model.dtype": "float64"})
    configs = [sweep.apply_overrides(base, o) for o in (
        {}, {"optim.lr": 3e-3, "optim.weight_decay": 1e-2, "model.partner_dropout": 0.2,
             "model.input_noise": 1.0,
             "loss.unimodal_weight": 0.5, "loss.terms.center": 0.1,
             "loss.unimodal_terms.center": 0.7})]
    assert len(sweep.plan_groups(configs, [3], "unimodal_map_average")) == 1
    _, states, history = seeds_lib.train_group(configs, [3, 3])
    for i, config in enumerate(configs):
      alone, step_losses, _ = _one_by_one(config, evaluate=False)(3)
      together = jax.device_get(seeds_lib.seed_state(states, i))
      for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(alone),
                              jax.tree.leaves(together)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-9, atol=1e-9,
                                   err_msg=jax.tree_util.keystr(path))
      np.testing.assert_allclose(history[0]["loss"][i], np.mean(step_losses), rtol=1e-9)
    # The two really trained differently.
    assert not np.allclose(jax.device_get(states.centers[0]), jax.device_get(states.centers[1]))


def test_configurations_that_need_another_program_are_separate_groups():
  base = _base(**{"model.partner_dropout": 0.5})
  configs = [sweep.apply_overrides(base, o) for o in (
      {"optim.lr": 1e-3}, {"optim.lr": 3e-3, "loss.terms.pair": 0.5},  # traced: one group
      {"num_epochs": 3},  # another loop
      {"model.partner_dropout": 0.0},  # no partner dropout at all: another program
      {"model.input_noise": 0.5},  # input noise: another program
      {"model.embed_dim": 8})]  # another width
  groups = sweep.plan_groups(configs, [0], "unimodal_map_average")
  assert [g.configs for g in groups] == [[0, 1], [2], [3], [4], [5]]
  with pytest.raises(ValueError, match="config 1 differs"):
    seeds_lib.train_group([configs[0], configs[2]], [0, 0])


def test_sweep_specs_and_their_errors(tmp_path):
  assert sweep.parse_sweep("optim.lr=1e-3,3e-3;loss.terms.pair=0.1") == [
      {"optim.lr": 1e-3, "loss.terms.pair": 0.1}, {"optim.lr": 3e-3, "loss.terms.pair": 0.1}]
  # Values are split at the commas outside brackets: a width is a tuple.
  assert sweep.parse_sweep("model.branch_features=(32,32,64),(16, 16, 32);model.name=dsf3n") == [
      {"model.branch_features": (32, 32, 64), "model.name": "dsf3n"},
      {"model.branch_features": (16, 16, 32), "model.name": "dsf3n"}]
  # The default sweep sets fields of the recipe it is documented on, in two programs (without
  # and with input noise).
  default = sweep.parse_sweep("default")
  assert [c["model.input_noise"] for c in default] == [0.0, 0.5, 1.0]
  assert all(c["num_epochs"] == 60 for c in default)
  recipe = paired_features.get_config("unimodal")
  recipe.data.path = "x.npz"
  groups = sweep.plan_groups([sweep.apply_overrides(recipe, c) for c in default], [0],
                             "unimodal_map_average")
  assert [g.configs for g in groups] == [[0], [1, 2]]
  listed = tmp_path / "s.json"
  listed.write_text(json.dumps([{"optim.lr": 1e-3}, {"model.partner_dropout": 0.8}]))
  assert sweep.parse_sweep(str(listed)) == [{"optim.lr": 1e-3}, {"model.partner_dropout": 0.8}]
  for bad, match in (("optim.lr", "PATH=V1,V2"), ("", "expected default"),
                     (str(tmp_path / "none.json"), "no such file")):
    with pytest.raises(ValueError, match=match):
      sweep.parse_sweep(bad)
  with pytest.raises(ValueError, match="optim.lrr"):
    sweep.apply_overrides(_base(), {"optim.lrr": 1.0})
  # A loss term may be added; any other new key is refused.
  assert sweep.apply_overrides(_base(), {"loss.terms.distill_pair": 0.0}).loss.terms[
      "distill_pair"] == 0.0
  # Configurations compete on one validation split, each with every seed: refused before
  # anything trains.
  for spec, match in (("seed=1,2", r"--sweep: seed \(configuration 0\): every configuration "
                                   r"trains each seed of --seeds"),
                      ("data.validation_fraction=0.0,0.25",
                       r"configuration 1 \(data.validation_fraction=0.25\) changes "
                       r"data.validation_fraction \(0.0 in configuration 0, 0.25 here\)"),
                      ("data.synthetic.num_train=96,80", r"changes data.synthetic"),
                      # What a sweep cannot select as main does is named, not done otherwise.
                      ("early_stopping_patience=2,3",
                       r"configuration 0 .*early_stopping_patience=2: a sweep trains every "
                       r"member for num_epochs")):
    with pytest.raises(ValueError, match=match):
      sweep.run_sweep(_base(), sweep.parse_sweep(spec), [0], str(tmp_path / "refused"),
                      log=lambda m: None)
  assert not (tmp_path / "refused").exists()
  # Members' states are selected on main's schedule: its selection evaluator's.
  config = _base()
  config.eval_every_epochs = 0
  assert sweep._selection_every_epochs(config) == 0  # main: only the final state
  config.evals = {"validation": {"type": "retrieval", "every_epochs": 3}}
  assert sweep._selection_every_epochs(config) == 3
  config.evals = {"validation": {"type": "retrieval", "every_steps": 50}}
  with pytest.raises(ValueError, match=r"config.evals.validation.every_steps=50: a sweep"):
    sweep._selection_every_epochs(config)


def test_a_configuration_whose_seeds_partly_failed_is_not_chosen_over_a_complete_one():
  def summary(values):
    return sweep._summary(values)

  # Configuration 1's one surviving seed scores highest; two of its three seeds diverged.
  ranked = sweep._ranked_scores([summary([0.80, 0.81, 0.79]), summary([0.82, None, None])], 3)
  assert ranked[1] is None and sweep._argmax(ranked) == 0
  # When no configuration finished every seed, the survivors' means still choose.
  ranked = sweep._ranked_scores([summary([0.80, None]), summary([0.82, None])], 2)
  assert sweep._argmax(ranked) == 1
  # A group saved by an earlier version that chose the partly failed one is trained again.
  saved = {"score_split": "validation", "config_indices": [4, 5], "chosen": {"config": 5},
           "configs": [{"summary": {"validation": {"m": summary([0.80, 0.81, 0.79])}}},
                       {"summary": {"validation": {"m": summary([0.82, None, None])}}}]}
  assert not sweep._saved_choice_holds(saved, "m", 3)
  assert sweep._saved_choice_holds({**saved, "chosen": {"config": 4}}, "m", 3)


def test_distillation_pulls_the_alone_embeddings_and_not_the_teacher():
  rng = np.random.default_rng(0)
  alone = [jnp.asarray(rng.normal(size=(6, 4)), jnp.float32) for _ in range(2)]
  teacher = [jnp.asarray(rng.normal(size=(6, 4)), jnp.float32) for _ in range(2)]
  labels = jnp.asarray([0, 1, 0, 2, 1, 0])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  t = unit(unit(np.asarray(teacher[0])) + unit(np.asarray(teacher[1])))
  centres = unit(np.stack([t[np.asarray(labels) == k].sum(0) for k in range(3)]))
  for target, goal in (("pair", t), ("class", centres[np.asarray(labels)])):
    expected = np.mean(sum(1 - np.sum(unit(np.asarray(a)) * goal, -1) for a in alone))
    got = losses.distill_loss(*alone, *teacher, labels, num_classes=3, target=target)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    grads = jax.grad(lambda a, t, target=target: losses.distill_loss(
        *a, *t, labels, num_classes=3, target=target), argnums=(0, 1))(alone, teacher)
    assert all(float(jnp.abs(g).sum()) > 0 for g in grads[0])
    assert all(float(jnp.abs(g).sum()) == 0 for g in grads[1])
  # In the paired loss (no teacher) the term is 0.
  term = losses.lookup_term("distill_class")
  outputs = (alone[0], alone[1], jnp.zeros((6, 3)), jnp.zeros((6, 3)))
  assert float(term(outputs, {"label": labels}, None)) == 0.0


# The tests that take ``swept`` run on one xdist worker (``--dist loadgroup``, pyproject.toml):
# spread over two, each worker would build it.
SHARES_SWEPT = pytest.mark.xdist_group("sweep_swept")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sweep")
  overrides = sweep.parse_sweep(SPEC)
  report = sweep.run_sweep(_base(), overrides, [0, 1], str(workdir), command="test",
                           log=lambda m: None)
  return workdir, overrides, report


def _chosen_config(workdir):
  """The config of the sweep's ``chosen_config.py`` in ``workdir``, imported afresh."""
  sys.path.insert(0, str(workdir))
  try:
    sys.modules.pop("chosen_config", None)
    import chosen_config  # noqa: PLC0415
  finally:
    sys.path.remove(str(workdir))
  return chosen_config.get_config()


def _chosen_run(workdir, config, split):
  """The sweep's ``chosen/`` run: its saved config, ``config``'s run parts, and the best
  checkpoint's ``unimodal_map_average`` on ``split``."""
  _, variables, run_config = restore.restore_model(workdir / "chosen", which="best")
  run = run_lib.prepare_run(config)
  state = seeds_lib.seed_state(seeds_lib.init_states(run, [0]), 0).replace(
      params=variables["params"], batch_stats=variables["batch_stats"])
  got = steps_lib.evaluate(steps_lib.make_embed_fn(run.model, run.mesh, protocol="unimodal"),
                           state, getattr(run.sources, split), config=config, mesh=run.mesh,
                           split=split, protocol="unimodal")
  return run_config, run, got["unimodal_map_average"]


@SHARES_SWEPT
def test_a_sweep_chooses_on_validation_and_writes_a_table_a_config_and_a_run(swept):
  workdir, overrides, report = swept
  rows = report["configs"]
  assert len(rows) == len(overrides) == 4
  for row in rows:
    assert [s["seed"] for s in row["seeds"]] == [0, 1]
    for split in ("validation", "test"):
      for key in ("map_average", "unimodal_map_average"):
        assert 0 < row["summary"][split][key]["mean"] <= 1
  scores = [r["summary"]["validation"]["unimodal_map_average"]["mean"] for r in rows]
  chosen = report["chosen"]
  assert chosen["config"] == int(np.argmax(scores))
  assert chosen["overrides"] == overrides[chosen["config"]]
  seeds_val = [s["validation"]["unimodal_map_average"] for s in rows[chosen["config"]]["seeds"]]
  assert chosen["seed"] == [0, 1][int(np.argmax(seeds_val))]
  table = (workdir / "sweep.md").read_text()
  assert "**(chosen)**" in table and table.count("\n| ") == 1 + 4
  assert "chosen by validation" in table and "Test is reported, not used to choose" in table
  # A sweep without a validation split chose on test, and its table says so.
  on_test = copy.deepcopy(report)
  for row in on_test["configs"]:
    row["score_split"] = "test"
  text = sweep.markdown(on_test)
  assert "chosen by test" in text and "not held-out results" in text
  assert "not used to choose" not in text
  # The margin of the choice: over the next best configuration, seed by seed.
  m, top = chosen["margin"], chosen["config"]
  assert m["runner_up"] == int(np.argmax([-np.inf if i == top else v
                                          for i, v in enumerate(scores)]))
  runner_val = [s["validation"]["unimodal_map_average"] for s in rows[m["runner_up"]]["seeds"]]
  assert m["per_seed"] == pytest.approx({"0": seeds_val[0] - runner_val[0],
                                         "1": seeds_val[1] - runner_val[1]})
  assert m["mean"] == pytest.approx(scores[top] - scores[m["runner_up"]])
  assert m["preferred_by"] == sum(v > 0 for v in m["per_seed"].values()) and m["seeds"] == 2
  assert m["runner_up_differs"] == {k: v for k, v in overrides[m["runner_up"]].items()
                                    if overrides[top][k] != v}
  assert sweep.margin_text(m) in table
  assert json.loads((workdir / "sweep.json").read_text())["chosen"] == chosen
  # The config file is the chosen configuration, seed included, refit on train + validation
  # (no split carved, the final state kept), and passes main's checks.
  from dsf3n_jax import config_check
  config = _chosen_config(workdir)
  config_check.validate(config, num_devices=jax.device_count())
  expected = sweep.apply_overrides(_base(), overrides[chosen["config"]])
  expected.seed = chosen["seed"]
  assert (config.data.validation_fraction, config.selection_split) == (0.0, "last")
  expected.data.validation_fraction, expected.selection_split = 0.0, "last"
  assert json.loads(config.to_json_best_effort()) == json.loads(expected.to_json_best_effort())
  # The refit: every seed trained again on train + validation, its final state on test,
  # unless it fits its validation pairs worse than its selected state scored on them held out.
  refit, selected = report["refit"], rows[chosen["config"]]["seeds"]
  assert [s["seed"] for s in refit["seeds"]] == [0, 1] and refit["epochs"] == 2
  for entry, before in zip(refit["seeds"], selected):
    assert entry["selected_validation"] == before["validation"]["unimodal_map_average"]
    assert entry["kept"] == ("refit" if entry["fit"] >= entry["selected_validation"]
                             else "selected")
    if entry["kept"] == "selected":
      assert entry["test"] == before["test"]
  assert refit["refit_seeds"] == sum(e["kept"] == "refit" for e in refit["seeds"])
  refit_test = [s["test"]["unimodal_map_average"] for s in refit["seeds"]]
  assert refit["summary"]["test"]["unimodal_map_average"]["mean"] == pytest.approx(
      np.mean(refit_test))
  assert "Refit of the chosen configuration on train + validation, 2 epochs" in table
  # The run holds the chosen seed's refit as its best checkpoint: its test metric is the
  # table's, and it trained on every train item (the validation carve included).
  i = [0, 1].index(chosen["seed"])
  assert refit["chosen_refit"] and refit["seeds"][i]["kept"] == "refit"  # (else: the next test)
  run_config, run, got = _chosen_run(workdir, config, "test")
  assert run_config.seed == chosen["seed"] and run_config.data.validation_fraction == 0.0
  carved = run_lib.prepare_run(_base()).sources
  assert run.sources.validation is None
  assert len(run.sources.train) == len(carved.train) + len(carved.validation)
  np.testing.assert_allclose(got, refit_test[i], atol=1e-6)


def test_a_refit_that_fits_its_validation_pairs_worse_keeps_the_selected_state(tmp_path):
  # Seed 0's selected state "scored" 2.0 on its validation pairs held out: no refit fits them
  # that well, so it keeps its selected state (and chosen/, its seed, is not the refit);
  # seed 1's "scored" -1: its refit is kept. A configuration of SPEC: its refit of seeds 0 and
  # 1 is the program the ``swept`` sweep's refit compiles (the persistent cache has it when
  # that ran first).
  base = sweep.apply_overrides(_base(), sweep.parse_sweep(SPEC)[0])
  config = sweep.refit_config(base)
  config.seed = 0
  fake = {k: 0.5 for k in sweep.REPORTED}
  selected = [{"seed": 0, "epoch": 1, "validation": {"unimodal_map_average": 2.0},
               "test": fake},
              {"seed": 1, "epoch": 2, "validation": {"unimodal_map_average": -1.0},
               "test": fake}]
  lines = []
  refit = sweep.train_refit(config, selected, tmp_path / "run", metric="unimodal_map_average",
                            carve=base.data, log=lines.append)
  first, second = refit["seeds"]
  assert (first["kept"], first["test"], first["epoch"]) == ("selected", fake, 1)
  assert second["kept"] == "refit" and second["epoch"] == 2 and second["test"] != fake
  assert 0 < first["fit"] <= 1 and 0 < second["fit"] <= 1
  assert (refit["refit_seeds"], refit["chosen_refit"]) == (1, False)
  assert not (tmp_path / "run").exists()
  assert any("seed 0: the refit fits its validation pairs" in line for line in lines)
  assert "1 of 2 seeds their refit, the others their selected state" in sweep._refit_text(refit)


def test_the_margin_says_whether_every_seed_prefers_the_chosen_configuration():
  def row(values):  # one configuration's validation scores, seed by seed (None: failed)
    return {"score_split": "validation", "seeds": [
        {"seed": seed, "validation": None if v is None else {"m": v}}
        for seed, v in enumerate(values)]}

  overrides = [{"a": 1, "b": 0}, {"a": 2, "b": 0}, {"a": 3, "b": 1}]
  rows = [row([0.90, 0.92, 0.91]), row([0.91, 0.90, 0.93]), row([0.5, 0.5, None])]
  scores = [sweep._summary([s["validation"]["m"] for s in r["seeds"] if s["validation"]])[
      "mean"] for r in rows]
  m = sweep.margin(rows, scores, 1, "m", overrides)
  assert m["runner_up"] == 0 and m["runner_up_differs"] == {"a": 1}
  assert m["per_seed"] == pytest.approx({"0": 0.01, "1": -0.02, "2": 0.02})
  assert (m["preferred_by"], m["seeds"]) == (2, 3) and m["mean"] == pytest.approx(0.01 / 3)
  text = sweep.margin_text(m)
  assert text == ("over configuration 0 (a=1) by +0.0033 (per seed +0.0100, -0.0200, +0.0200; "
                  "2 of 3 seeds prefer it: within the seeds' noise)")
  # Against a configuration with a failed seed: only the seeds both finished count.
  m = sweep.margin(rows, [None, scores[1], 0.5], 1, "m", overrides)
  assert m["runner_up"] == 2 and m["runner_up_differs"] == {"a": 3, "b": 1}
  assert (m["preferred_by"], m["seeds"]) == (2, 2)
  assert sweep.margin_text(m).endswith("every seed prefers it)")
  rows[2]["seeds"] = rows[2]["seeds"][:1]  # one seed in common
  assert sweep.margin_text(sweep.margin(rows, [None, scores[1], 0.5], 1, "m", overrides)
                           ).endswith("(one seed, +0.4100: more seeds would tell whether the "
                                      "choice holds)")
  rows[2]["seeds"] = [{"seed": 0, "validation": {"m": float("nan")}}]
  assert sweep.margin_text(sweep.margin(rows, [None, scores[1], 0.5], 1, "m", overrides)
                           ).endswith("by +0.4133 (no seed finished both)")
  assert sweep.margin(rows, [None, scores[1], None], 1, "m", overrides) is None
  assert sweep.margin_text(None) == "the only configuration"


@SHARES_SWEPT
def test_a_rerun_keeps_the_finished_groups(swept, tmp_path):
  # On a copy: the module's sweep stays as it ended for the other tests, in any order.
  workdir, overrides, report = swept
  workdir = pathlib.Path(shutil.copytree(workdir, tmp_path / "sweep"))
  shutil.copy(workdir / "chosen_config.py", tmp_path / "first_chosen_config.py")
  lines = []
  again = sweep.run_sweep(_base(), overrides, [0, 1], str(workdir), command="test",
                          log=lines.append)
  assert any("finished earlier, kept" in line for line in lines)
  assert "refit: finished earlier, kept" in lines
  assert not any("epoch" in line for line in lines)
  assert again["configs"] == report["configs"] and again["chosen"] == report["chosen"]
  assert again["refit"] == report["refit"]
  # Without the refit (nothing trains again), chosen/ holds the chosen seed's selected state
  # as its best checkpoint: its validation metric is the table's.
  lines.clear()
  kept = sweep.run_sweep(_base(), overrides, [0, 1], str(workdir), command="test",
                         refit=False, log=lines.append)
  assert not any("epoch" in line for line in lines) and "refit" not in kept
  assert kept["refit_unpublished"] == report["refit"]  # the refit's record is kept aside
  assert "Refit" not in (workdir / "sweep.md").read_text()
  chosen = kept["chosen"]
  seeds_val = [s["validation"]["unimodal_map_average"]
               for s in kept["configs"][chosen["config"]]["seeds"]]
  config = _chosen_config(workdir)
  assert config.data.validation_fraction == 0.25 and config.selection_split == "validation"
  run_config, _, got = _chosen_run(workdir, config, "validation")
  assert run_config.seed == chosen["seed"]
  np.testing.assert_allclose(got, max(seeds_val), atol=1e-4)
  # --refit after --norefit: the earlier refit is published again, nothing trains.
  lines.clear()
  back = sweep.run_sweep(_base(), overrides, [0, 1], str(workdir), command="test",
                         log=lines.append)
  assert "refit: finished earlier, kept" in lines
  assert not any("epoch" in line for line in lines)
  assert back["refit"] == report["refit"] and "refit_unpublished" not in back
  assert (workdir / "chosen_config.py").read_text() == (
      tmp_path / "first_chosen_config.py").read_text()


@SHARES_SWEPT
def test_a_sweep_whose_workdir_another_sweep_took_over_stops_before_its_next_write(
    swept, tmp_path, monkeypatch):
  """A rerun that trains its first group again (its record dropped from ``sweep.json``) while
  another sweep takes the workdir over (``train_group`` stands in for that training): a
  ``WorkdirError`` naming that sweep before the group's results are written, the workdir as
  it was, and that sweep's lock left in it."""
  from dsf3n_jax.training import workdir as workdir_lib
  from tests.test_loop import _OTHER_RUN, _take_over, renewing_fast
  workdir, overrides, report = swept
  workdir = pathlib.Path(shutil.copytree(workdir, tmp_path / "sweep"))
  doc = json.loads((workdir / "sweep.json").read_text())
  groups = len(doc["groups"])
  del doc["groups"][next(iter(doc["groups"]))]  # the plan's first group
  (workdir / "sweep.json").write_text(json.dumps(doc))
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  locks = []
  other = {**_OTHER_RUN, "renewed": time.time()}

  def train_group(configs, seeds, **kwargs):  # the group trains; meanwhile its lease lapses
    _take_over(locks[0], other)
    return {"configs": []}, None

  monkeypatch.setattr(workdir_lib, "WorkdirLock", renewing_fast(locks))
  monkeypatch.setattr(sweep, "train_group", train_group)
  with pytest.raises(workdir_lib.WorkdirError) as stopped:
    sweep.run_sweep(_base(), overrides, [0, 1], str(workdir), command="test",
                    log=lambda m: None)
  assert str(stopped.value) == (
      f"--workdir={workdir}: another run took it over while this run's lock lease had lapsed "
      "(this process stopped, or cut off from the workdir, for over 120 s): pid 4242 on host "
      f"other-host (started 2030-01-02 03:04:05) holds {workdir}/sweep.lock now; this run "
      f"stopped after training group 1/{groups}, before writing its results, and left that "
      "run's lock as it is")
  lock = workdir / "sweep.lock"
  assert json.loads(lock.read_text()) == other
  after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p != lock}
  assert after == before


def test_the_command_line_reports_a_bad_sweep_in_one_line(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.run(
      [sys.executable, "-m", "dsf3n_jax.sweep", "--config=configs/synthetic.py:runlocal,tiny",
       f"--workdir={tmp_path}", "--sweep=optim.nope=1,2"], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == ["error: --sweep: optim.nope: the config has no field 'optim.nope'"], \
      proc.stderr
