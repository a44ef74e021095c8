"""Hyper-parameter sweeps, chosen on validation, many configurations trained as one program.

  python -m dsf3n_jax.sweep --config=configs/paired_features.py:unimodal,small \
      --config.data.path=FILE.npz --sweep=default --seeds=0,1,2 --workdir=DIR

``--sweep`` is ``default`` (``DEFAULT_SWEEP``, the search space documented in the
README), a spec ``PATH=V1,V2;PATH=V1,V2`` (the grid of every combination; values are
split at the commas outside brackets, so ``(32,32,64),(16,16,32)`` is two tuples), or a
``.json`` file holding such a grid (``{"optim.lr": [1e-3, 3e-3], ...}``) or a list
of configurations (``[{"optim.lr": 1e-3}, {"optim.lr": 3e-3, ...}]``). Each path
is a field of the ``--config`` config, set on top of it (``loss.terms.<name>`` and
``loss.unimodal_terms.<name>`` may add a term).

Every configuration trains once per seed. Configurations that differ only in the
hyper-parameters ``training.seeds`` traces (the learning rate, weight decay,
partner dropout, the unimodal weight and every loss term's weight) form one
group: its members (configuration x seed) are stacked and trained by one
compiled, vmapped step (``seeds.train_group``); each member ends exactly as
``python -m dsf3n_jax.main`` trains its configuration with that seed. Other
differences (widths, epochs, data settings) make separate groups, run one after
the other.

Each member keeps its best state on the validation split by its config's
``selection_metric`` (as ``main`` selects its checkpoint, at the same epochs).
Each configuration is scored by the mean over its seeds of the validation
``--metric`` (default ``unimodal_map_average``); the best is chosen on
validation only, and the test split is reported beside it, never used to choose.

Then (``--refit``, the default) the chosen configuration trains again, each seed,
on train and validation together (``data.validation_fraction=0``: the split that
chose it goes back into training, as scikit-learn's ``refit``), for its epochs, and
keeps its final state (``selection_split="last"``: nothing is left to select on).
A seed whose refit fits the validation pairs it trained on worse than its selected
state scored on them held out has not fit its data (a run that degraded late, which
no split is left to catch) and keeps its selected state. The refit's test numbers
are the sweep's answer; the selection's are kept beside them. ``--norefit`` keeps
the selected states instead.

The workdir gets:

- ``sweep.json`` and ``sweep.md``: every configuration, validation and test,
  both protocols, mean and standard deviation over the seeds, which was chosen and
  how clearly (``margin``: over the runner-up, seed by seed), and the refit's test;
- ``chosen_config.py``: the chosen configuration, seed included (refit: on train +
  validation, the final state kept):
  ``python -m dsf3n_jax.main --config=DIR/chosen_config.py --workdir=...`` trains it
  again;
- ``chosen/``: a run directory with the chosen configuration's best seed (by
  validation; refit: that seed's refit, unless it kept its selected state), for
  ``retrieve``, ``visualize`` and ``convert`` (``--workdir=DIR/chosen``).

A finished group (and the refit) is saved at once; a rerun into the same workdir
skips the groups whose configurations, seeds and metric are unchanged (a killed
sweep resumes at its first unfinished group), and the refit too. A ``--norefit``
rerun publishes the selected state and keeps an earlier refit's record aside
(``refit_unpublished`` in ``sweep.json``); a ``--refit`` rerun after it publishes
that refit again without training. One sweep runs per workdir (``sweep.lock``,
``WorkdirLock``): one whose lease lapsed and whose workdir another sweep took over
raises ``WorkdirError`` before its next write (a group's results, the refit's run,
``chosen/``, ``sweep.json``), naming that sweep, and leaves its lock as it is.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import flags

from dsf3n_jax import main as main_lib

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(main_lib)  # --config, --workdir, ...: listed by --help too
flags.DEFINE_string("sweep", None, "default, PATH=V1,V2;PATH=V1,V2 (a grid) or a .json file.")
flags.DEFINE_string("seeds", "0", "Comma-separated seeds each configuration trains with.")
flags.DEFINE_string("metric", "unimodal_map_average",
                    "Validation metric the configuration is chosen by (mean over seeds).")
flags.DEFINE_bool("refit", True, "Train the chosen configuration again on train + validation "
                  "(each seed, its final state) for the reported test numbers and chosen/.")

# The default search space on top of ``configs/paired_features.py:unimodal`` (README,
# "Sweeps"): 3 configurations in two programs (without and with input noise), each trained for
# 60 epochs at lr 3e-3 with partner dropout 0.75 and the alone-centre weight 0.1. Measured on
# fsdd_digits and synthetic (docs/evaluation.md, "Sweeps"): the number of epochs and the input
# noise moved the unimodal test mAP most, the noise in opposite directions on the two sets
# (1.0: among the best on synthetic, the worst on fsdd_digits), which is what the choice on
# validation is for; lr 3e-3 was chosen over 1e-3 on both sets at 30 and at 60 epochs, and
# partner dropout 0.75 with centre weight 0.1 beat the recipe's 0.5 and 0.3 at every level
# of noise on both sets.
DEFAULT_SWEEP: dict[str, list[Any]] = {
    "num_epochs": [60],
    "optim.lr": [3e-3],
    "model.partner_dropout": [0.75],
    "loss.unimodal_terms.center": [0.1],
    "model.input_noise": [0.0, 0.5, 1.0],
}
METRICS = ("map_average", "unimodal_map_average")
REPORTED = ("map_average", "unimodal_map_average", "map_audio_to_visual",
            "map_visual_to_audio", "unimodal_map_audio_to_visual",
            "unimodal_map_visual_to_audio")
ADDABLE = ("loss.terms", "loss.unimodal_terms")  # paths whose keys may be new


# -- the configurations -------------------------------------------------------------------------


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    return text.strip()


def _values(text: str) -> list[Any]:
  """``V1,V2`` -> values, split at the commas outside brackets: ``(32,32,64),(16,16,32)`` is
  two tuples."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += (ch in "([{") - (ch in ")]}")
    if ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  return [_literal(p) for p in [*parts, text[start:]]]


def _grid(grid: Mapping[str, Sequence[Any]], where: str) -> list[dict[str, Any]]:
  for path, values in grid.items():
    if not isinstance(values, (list, tuple)) or not values:
      raise ValueError(f"{where}: {path!r}: expected a non-empty list of values, got "
                       f"{values!r}")
  paths = list(grid)
  return [dict(zip(paths, combo)) for combo in itertools.product(*(grid[p] for p in paths))]


def parse_sweep(text: str) -> list[dict[str, Any]]:
  """``--sweep``'s configurations, each as ``{config path: value}`` overrides."""
  text = (text or "").strip()
  if not text:
    raise ValueError("--sweep: expected default, PATH=V1,V2;... or a .json file, got nothing")
  if text == "default":
    return _grid(DEFAULT_SWEEP, "DEFAULT_SWEEP")
  if text.endswith(".json"):
    if not os.path.isfile(text):
      raise ValueError(f"--sweep={text}: no such file")
    try:
      with open(text) as f:
        spec = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"--sweep={text}: not JSON ({e})") from e
    if isinstance(spec, dict):
      return _grid(spec, f"--sweep={text}")
    if isinstance(spec, list) and spec and all(isinstance(c, dict) for c in spec):
      return [dict(c) for c in spec]
    raise ValueError(f"--sweep={text}: expected an object {{path: [values]}} (a grid) or a "
                     f"non-empty list of {{path: value}} objects, got {type(spec).__name__}")
  grid = {}
  for item in (i for i in text.split(";") if i.strip()):
    path, sep, values = item.partition("=")
    if not sep or not path.strip() or not values.strip():
      raise ValueError(f"--sweep: {item!r}: expected PATH=V1,V2 (e.g. optim.lr=1e-3,3e-3)")
    grid[path.strip()] = _values(values)
  return _grid(grid, "--sweep")


def apply_overrides(base: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of ``base`` with each ``path: value`` set; an unknown path is an error."""
  config = base.copy_and_resolve_references()
  config.unlock()  # main's --config is locked; loss.terms may gain a term
  for path, value in overrides.items():
    *parents, last = path.split(".")
    node = config
    for i, p in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        raise ValueError(f"--sweep: {path}: the config has no field "
                         f"{'.'.join(parents[:i + 1])!r}")
      node = node[p]
    parent = ".".join(parents)
    if not isinstance(node, ml_collections.ConfigDict) or (
        last not in node and parent not in ADDABLE):
      raise ValueError(f"--sweep: {path}: the config has no field {path!r}")
    try:
      node[last] = value
    except TypeError as e:
      raise ValueError(f"--sweep: {path}={value!r}: {e}") from e
  return config


# What defines the splits a configuration is selected and scored on.
SPLIT_FIELDS = ("name", "path", "validation_fraction", "validation_seed", "validation_groups",
                "synthetic")


def _check_comparable(configs: Sequence[ml_collections.ConfigDict],
                      overrides: Sequence[Mapping[str, Any]]) -> None:
  """The configurations are chosen between on one validation split, each with ``--seeds``: a
  sweep of the seed, or of the data that makes the splits, is refused."""
  for i, o in enumerate(overrides):
    if "seed" in o:
      raise ValueError(f"--sweep: seed (configuration {i}): every configuration trains each "
                       "seed of --seeds; give the seeds there")
  def splits(config):
    return {k: json.loads(json.dumps(config.data[k].to_dict() if k == "synthetic"
                                     else config.data.get(k))) for k in SPLIT_FIELDS}
  first = splits(configs[0])
  for i, config in enumerate(configs[1:], 1):
    differ = [k for k, v in splits(config).items() if v != first[k]]
    if differ:
      raise ValueError(
          f"--sweep: configuration {i} ({_label(overrides[i])}) changes data.{differ[0]} "
          f"({first[differ[0]]!r} in configuration 0, {splits(config)[differ[0]]!r} here): "
          "configurations are compared on one validation split (and test), so the data and "
          "its carve are the same for all; sweep them in separate sweeps")


@dataclasses.dataclass
class Group:
  """Configurations that train as one program, each with every seed."""
  configs: list[int]  # indices into the sweep's configurations
  key: str  # seeds.program_key
  fingerprint: str = ""


def plan_groups(configs: Sequence[ml_collections.ConfigDict], seeds: Sequence[int],
                metric: str) -> list[Group]:
  """The configurations grouped by program, in order of first appearance."""
  from dsf3n_jax.training import seeds as seeds_lib
  groups: dict[str, Group] = {}
  for i, config in enumerate(configs):
    key = seeds_lib.program_key(config)
    groups.setdefault(key, Group([], key)).configs.append(i)
  for group in groups.values():
    what = {"key": group.key, "seeds": list(seeds), "metric": metric,
            "configs": [json.loads(configs[i].to_json_best_effort()) for i in group.configs]}
    group.fingerprint = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
  return list(groups.values())


# -- training a group ---------------------------------------------------------------------------


def _selection_every_epochs(config: ml_collections.ConfigDict) -> int:
  """Epochs between the evaluations ``main`` selects a run's state on: its selection
  evaluator's schedule (0: only at the end). What a sweep cannot do as ``main`` does is an
  error naming the setting: a step schedule (members are evaluated at epoch ends) and early
  stopping (every member trains ``num_epochs``)."""
  from dsf3n_jax import evaluators as evaluators_lib
  from dsf3n_jax.training import run as run_lib
  patience = int(config.get("early_stopping_patience", 0) or 0)
  if patience:
    raise ValueError(f"config.early_stopping_patience={patience}: a sweep trains every member "
                     "for num_epochs and selects its state as main does without early "
                     "stopping; set it to 0")
  selection = run_lib.selection_of(config)[0]
  if selection == run_lib.LAST:  # main keeps the final state
    return 0
  for spec in evaluators_lib.specs(config):
    if spec.name == selection:
      if spec.every_steps:
        raise ValueError(f"config.evals.{spec.name}.every_steps={spec.every_steps}: a sweep "
                         "evaluates its members at the end of epochs; give every_epochs")
      return spec.every_epochs
  return int(config.get("eval_every_epochs", 1))


def _protocol(metric: str) -> str:
  if metric not in METRICS:
    raise ValueError(f"selection metric: expected one of {', '.join(METRICS)}, got {metric!r}")
  return "unimodal" if metric.startswith("unimodal_") else "paired"


def _seed_scores(seeds: Sequence[Mapping[str, Any]], split: str,
                 metric: str) -> dict[int, float | None]:
  """``{seed: its metric on split}`` of a configuration's per-seed results (None: failed)."""
  return {s["seed"]: (s[split] or {}).get(metric) for s in seeds}


def _summary(values: Sequence[float | None]) -> dict[str, float | None]:
  good = [v for v in values if v is not None and np.isfinite(v)]
  return {"mean": float(np.mean(good)) if good else None,
          "std": float(np.std(good)) if good else None, "n": len(good)}


def train_group(configs: Sequence[ml_collections.ConfigDict], seeds: Sequence[int], *,
                metric: str, log: Callable[[str], None]) -> tuple[dict[str, Any], Any]:
  """Trains one group's configurations x seeds together; evaluates each member's best state.

  Returns the group's results (per configuration: each seed's selected epoch and its
  validation and test metrics, both protocols) and ``(config index within the group,
  seed, variables, best)`` of the best seed of the group's best configuration (``best``: its
  evaluation, the run's "best" record).
  """
  import jax

  from dsf3n_jax import losses
  from dsf3n_jax.training import run as run_lib
  from dsf3n_jax.training import seeds as seeds_lib
  from dsf3n_jax.training import steps as steps_lib
  members = [(c, s) for c in range(len(configs)) for s in seeds]
  member_configs = [configs[c] for c, _ in members]
  best: list[dict[str, Any] | None] = [None] * len(members)
  loss_fns = [losses.loss_from_config(c.loss) for c in configs]  # compiled once each
  run = run_lib.prepare_run(configs[0])
  select_metric = run.metric  # each member's state is selected as main selects it
  if select_metric not in METRICS:
    raise ValueError(f"config.selection_metric={configs[0].selection_metric!r}: a sweep selects "
                     f"each member's state by one of {', '.join(METRICS)}")
  select_split = "validation"
  if run.sources.validation is None:
    select_split = "test"
    log("warning: no validation split (config.data.validation_fraction=0): each member's "
        "best state and the choice are made on the test split")

  def evaluate(state, c, split, protocol):
    embed_fn = steps_lib.make_embed_fn(run.model, run.mesh, protocol=protocol)
    return steps_lib.evaluate(embed_fn, state, getattr(run.sources, split), config=configs[c],
                              mesh=run.mesh, split=split, loss_fn=loss_fns[c],
                              protocol=protocol)

  every = _selection_every_epochs(configs[0])

  def on_states(epoch, states):
    if epoch != configs[0].num_epochs and (not every or epoch % every):
      return  # main evaluates (and selects) only on its selection evaluator's schedule
    finite = seeds_lib.finite_seeds(states)
    for i, (c, _) in enumerate(members):
      if not finite[i]:
        continue
      state = seeds_lib.seed_state(states, i)
      value = evaluate(state, c, select_split, _protocol(select_metric))[select_metric]
      if np.isfinite(value) and (best[i] is None or value > best[i]["value"]):
        best[i] = {"epoch": epoch, "value": float(value),
                   "state": jax.device_get(state.replace(opt_state=None))}
    values = [b["value"] for b in best if b is not None]
    log(f"epoch {epoch}: best {select_split} {select_metric} so far, per member: "
        + (f"{min(values):.4f} .. {max(values):.4f}" if values else "none finite"))

  run, states, history = seeds_lib.train_group(
      member_configs, [s for _, s in members], on_states=on_states, run=run,
      on_epoch=_epoch_logger(log, configs[0].num_epochs, f"{len(members)} members"))
  del states
  per_config: list[dict[str, Any]] = [{"seeds": []} for _ in configs]
  for i, (c, seed) in enumerate(members):
    entry: dict[str, Any] = {"seed": seed, "epoch": None, "validation": None, "test": None}
    if best[i] is not None:
      state = best[i]["state"]
      entry["epoch"] = best[i]["epoch"]
      for split in ("validation", "test"):
        if getattr(run.sources, split) is not None:
          m = evaluate(state, c, split, "both")
          entry[split] = {k: float(m[k]) for k in REPORTED}
    per_config[c]["seeds"].append(entry)
  for result in per_config:
    result["summary"] = {
        split: {k: _summary([(s[split] or {}).get(k) for s in result["seeds"]])
                for k in REPORTED}
        for split in ("validation", "test")}
  score_split = select_split  # the configurations are scored where the states were selected
  scores = _ranked_scores([r["summary"][score_split][metric] for r in per_config], len(seeds))
  top = _argmax(scores)
  chosen = None
  if top is not None:
    seed_scores = list(_seed_scores(per_config[top]["seeds"], score_split, metric).values())
    k = _argmax(seed_scores)
    i = members.index((top, seeds[k]))
    chosen = (top, seeds[k], {"params": best[i]["state"].params,
                              "batch_stats": best[i]["state"].batch_stats},
              {"selected_on": score_split, "metric": metric, "value": seed_scores[k],
               "sweep_epoch": best[i]["epoch"]})
  result = {"configs": per_config, "score_split": score_split,
            "seconds": float(sum(h["seconds"] for h in history)),
            "members": len(members), "epochs": int(configs[0].num_epochs)}
  return result, chosen


def _epoch_logger(log: Callable[[str], None], epochs: int, what: str):
  """``train_group``'s ``on_epoch``: one line per epoch (``what``: who trains together)."""
  def on_epoch(epoch, means, seconds):
    loss = np.asarray(means["loss"])
    log(f"epoch {epoch}/{epochs} of {what} together ({seconds:.1f} s), train loss "
        f"{np.nanmin(loss):.3f} .. {np.nanmax(loss):.3f}")
  return on_epoch


def _ranked_scores(summaries: Sequence[Mapping[str, Any] | None],
                   num_seeds: int) -> list[float | None]:
  """The means configurations are chosen by. A configuration some of whose seeds failed (a
  diverged state, no finite evaluation) is out of the choice while any configuration finished
  every seed: its mean is of the seeds that survived."""
  means = [None if s is None else s["mean"] for s in summaries]
  complete = [s is not None and s["n"] == num_seeds for s in summaries]
  if any(c and m is not None for c, m in zip(complete, means)):
    return [m if c else None for m, c in zip(means, complete)]
  return means


def _saved_choice_holds(saved: Mapping[str, Any], metric: str, num_seeds: int) -> bool:
  """Whether a group saved by an earlier run chose as ``train_group`` chooses now (a sweep
  resumed across versions: its saved run is its chosen configuration's)."""
  try:
    scores = _ranked_scores([c["summary"][saved["score_split"]][metric]
                             for c in saved["configs"]], num_seeds)
  except (KeyError, TypeError):
    return False
  top = _argmax(scores)
  chosen = saved.get("chosen")
  if chosen is None or top is None:
    return chosen is None and top is None
  return saved["config_indices"][top] == chosen["config"]


def _argmax(values: Sequence[float | None]) -> int | None:
  good = [(v, -i) for i, v in enumerate(values) if v is not None and np.isfinite(v)]
  return -max(good)[1] if good else None


# -- the sweep ----------------------------------------------------------------------------------


def run_sweep(base: ml_collections.ConfigDict, overrides: Sequence[Mapping[str, Any]],
              seeds: Sequence[int], workdir: str, *, metric: str = "unimodal_map_average",
              refit: bool = True, command: str = "",
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Trains every configuration x seed, group by group, chooses on validation, then (``refit``)
  trains the chosen configuration again on train + validation; writes the workdir's outputs.

  Returns the report written to ``sweep.json``.
  """
  from dsf3n_jax import config_check, paths
  from dsf3n_jax.training import restore
  from dsf3n_jax.training import workdir as workdir_lib
  log = log or workdir_lib.log
  _protocol(metric)
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds: expected distinct integers, got {list(seeds)}")
  if not overrides:
    raise ValueError("--sweep: no configurations")
  configs = [apply_overrides(base, o) for o in overrides]
  _check_comparable(configs, overrides)
  import jax
  for i, config in enumerate(configs):
    try:
      config_check.validate(config, num_devices=jax.device_count())
      _selection_every_epochs(config)
    except ValueError as e:
      raise ValueError(f"--sweep configuration {i} ({_label(overrides[i])}): {e}") from e
  groups = plan_groups(configs, seeds, metric)
  root = workdir_lib.prepare(workdir)
  report_path = root / "sweep.json"
  lock = workdir_lib.WorkdirLock(root, name="sweep.lock")
  lock.acquire()
  try:
    previous = _load(report_path)
    done = previous.get("groups", {}) if isinstance(previous.get("groups"), dict) else {}
    report = {"command": command, "metric": metric, "seeds": list(seeds),
              "overrides": [dict(o) for o in overrides], "groups": {}, "machine": _machine()}
    t0 = time.perf_counter()
    for g, group in enumerate(groups):
      name = f"group {g + 1}/{len(groups)}"
      saved = done.get(group.fingerprint)
      if saved is not None and not _saved_choice_holds(saved, metric, len(seeds)):
        log(f"{name}: its saved run is of the configuration an earlier version chose (one with "
            "a diverged seed): trained again")
        saved = None
      if saved is not None and (root / "groups" / group.fingerprint).is_dir():
        log(f"{name}: {len(group.configs)} configurations x {len(seeds)} seeds: finished "
            f"earlier, kept")
        # The same configurations (the fingerprint says so), wherever they sit in this sweep.
        report["groups"][group.fingerprint] = {**saved, "config_indices": list(group.configs)}
        if saved.get("chosen"):
          local = saved["config_indices"].index(saved["chosen"]["config"])
          report["groups"][group.fingerprint]["chosen"] = {**saved["chosen"],
                                                           "config": group.configs[local]}
        continue
      log(f"{name}: {len(group.configs)} configurations x {len(seeds)} seeds = "
          f"{len(group.configs) * len(seeds)} members, one program")
      result, chosen = train_group([configs[i] for i in group.configs], seeds, metric=metric,
                                   log=lambda m, name=name: log(f"{name}: {m}"))
      result["config_indices"] = list(group.configs)
      lock.raise_if_lost(f"after training {name}, before writing its results")
      if chosen is not None:
        c, seed, variables, best_meta = chosen
        chosen_config = configs[group.configs[c]].copy_and_resolve_references()
        chosen_config.seed = int(seed)
        paths.publish_folder(root / "groups" / group.fingerprint,
                 functools.partial(restore.save_variables_as_run, variables=variables,
                                   config=chosen_config, best=best_meta))
        result["chosen"] = {"config": group.configs[c], "seed": int(seed)}
      report["groups"][group.fingerprint] = result
      paths.atomic_write(report_path, json.dumps(report, indent=1))
    choose(report, configs)
    chosen = report["chosen"]
    if chosen is not None:
      log(f"chosen: configuration {chosen['config']} ({_label(chosen['overrides'])}), "
          f"{margin_text(chosen['margin'])}")
      config = configs[chosen["config"]].copy_and_resolve_references()
      config.seed = int(chosen["seed"])
      row = report["configs"][chosen["config"]]
      run_dir = root / "groups" / row["group"]
      refit_cfg = refit_config(config)
      fingerprint = plan_groups([refit_cfg], seeds, metric)[0].fingerprint
      refit_dir = root / "groups" / fingerprint
      # An earlier refit of this choice, published or kept aside by a --norefit rerun.
      saved = previous.get("refit") or previous.get("refit_unpublished") or {}
      earlier = (row["score_split"] == "validation" and saved.get("fingerprint") == fingerprint
                 and (refit_dir.is_dir() or not saved.get("chosen_refit")))
      if not refit and earlier:  # --norefit: chosen/ is the selected state; the refit stays
        report["refit_unpublished"] = saved
        where = f" in {refit_dir}" if saved.get("chosen_refit") else ""
        log(f"refit: an earlier refit of this choice is kept{where}, unpublished (--norefit); "
            "--refit publishes it without training again")
      if refit and row["score_split"] == "validation":
        if earlier:
          log("refit: finished earlier, kept")
          report["refit"] = saved
        else:
          report["refit"] = train_refit(refit_cfg, row["seeds"], refit_dir, metric=metric,
                                        carve=config.data, log=lambda m: log(f"refit: {m}"),
                                        before_writing=lock.raise_if_lost)
          report["refit"]["fingerprint"] = fingerprint
        log(f"refit on train + validation: test {_refit_text(report['refit'])}")
        if report["refit"]["chosen_refit"]:
          config, run_dir = refit_cfg, refit_dir
      elif refit:
        log("refit: skipped, the data has no validation split to add to train")
      lock.raise_if_lost(f"before publishing {root / 'chosen'}")
      publish_chosen(config, report, root, run_dir)
    report["seconds"] = time.perf_counter() - t0
    lock.raise_if_lost(f"before writing {report_path} and sweep.md")
    paths.atomic_write(report_path, json.dumps(report, indent=1))
    paths.atomic_write(root / "sweep.md", markdown(report))
  finally:
    lock.release()
  return report


def choose(report: dict[str, Any], configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Adds every configuration's results (``configs``) and the choice (``chosen``)."""
  rows: list[dict[str, Any] | None] = [None] * len(configs)
  for fp, group in report["groups"].items():
    for local, index in enumerate(group["config_indices"]):
      rows[index] = {"group": fp, **group["configs"][local],
                     "score_split": group["score_split"]}
  report["configs"] = rows
  metric = report["metric"]
  scores = _ranked_scores([None if r is None else r["summary"][r["score_split"]][metric]
                           for r in rows], len(report["seeds"]))
  top = _argmax(scores)
  if top is None:
    report["chosen"] = None
    return
  group = report["groups"][rows[top]["group"]]
  if group["chosen"]["config"] != top:  # a group's run is its best configuration's
    raise RuntimeError(f"sweep: the best configuration {top} is not its group's saved run "
                       f"({group['chosen']['config']})")
  report["chosen"] = {"config": top, "overrides": report["overrides"][top],
                      "seed": group["chosen"]["seed"],
                      "selected_on": f"{rows[top]['score_split']} {metric}, mean over seeds",
                      "run": "chosen", "config_file": "chosen_config.py",
                      "margin": margin(rows, scores, top, metric, report["overrides"])}


def publish_chosen(config: ml_collections.ConfigDict, report: dict[str, Any], root,
                   run_dir) -> None:
  """Writes ``chosen_config.py`` (``config``) and ``chosen/`` (a copy of ``run_dir``)."""
  from dsf3n_jax import paths
  paths.atomic_write(root / "chosen_config.py", config_file(config, report))
  paths.publish_folder(root / "chosen", lambda tmp: shutil.copytree(run_dir, tmp))


# -- the refit ----------------------------------------------------------------------------------


def refit_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` trained on train + validation: no split carved, the final state kept."""
  config = config.copy_and_resolve_references()
  config.data.validation_fraction = 0.0
  config.selection_split = "last"  # its validation evaluators are skipped: no split to run on
  return config


def train_refit(config: ml_collections.ConfigDict, selected: Sequence[Mapping[str, Any]],
                run_dir, *, metric: str, carve: ml_collections.ConfigDict,
                log: Callable[[str], None],
                before_writing: Callable[[str], None] = lambda stopped: None) -> dict[str, Any]:
  """Trains ``config`` (``refit_config``'s) once per seed of ``selected`` (the chosen
  configuration's per-seed results), all seeds as one program, and evaluates each final state.

  A refit that fits the validation pairs it trained on (``carve``: the data section that
  carved them) worse, by ``metric``, than the seed's selected state scored on them held out
  has not fit its data (a run that degraded late, which no split is left to catch): that seed
  keeps its selected state. ``run_dir`` gets ``config.seed``'s refit as a run when it is kept;
  ``before_writing(where)`` is called first (the sweep's lock: ``WorkdirLock.raise_if_lost``).

  Returns ``{"seeds": [{"seed", "epoch", "test", "kept", "fit", "selected_validation"}],
  "summary": {"test": ...}, "refit_seeds", "chosen_refit", "seconds", "epochs"}``.
  """
  import dataclasses

  import jax

  from dsf3n_jax import input_pipeline, paths
  from dsf3n_jax.training import restore
  from dsf3n_jax.training import seeds as seeds_lib
  seeds = [int(s["seed"]) for s in selected]
  run, states, history = seeds_lib.train_group(
      [config] * len(seeds), seeds,
      on_epoch=_epoch_logger(log, config.num_epochs, f"{len(seeds)} seeds"))
  test = seeds_lib.evaluate_seeds(run, states, "test")
  arrays = input_pipeline.load_split_arrays(run.sources.train)
  _, carved = input_pipeline.carve_validation(
      run.sources.train, arrays["label"], fraction=carve.validation_fraction,
      seed=carve.validation_seed, groups=carve.get("validation_groups", "none"), arrays=arrays)
  held = dataclasses.replace(run, sources=dataclasses.replace(run.sources, validation=carved))
  fits = seeds_lib.evaluate_seeds(held, states, "validation")
  entries = []
  for seed, chosen, m, fit in zip(seeds, selected, test, fits):
    before = (chosen.get("validation") or {}).get(metric)
    fit = None if fit is None else float(fit[metric])
    kept = "refit" if fit is not None and (before is None or fit >= before) else "selected"
    if kept == "selected":
      show = lambda v: "non-finite" if v is None else f"{v:.4f}"
      log(f"seed {seed}: the refit fits its validation pairs at {show(fit)} {metric}, below "
          f"the selected state's {show(before)} on them held out: it keeps the selected state")
    entries.append({"seed": seed, "kept": kept, "fit": fit, "selected_validation": before,
                    "epoch": int(config.num_epochs) if kept == "refit" else chosen.get("epoch"),
                    "test": ({k: float(m[k]) for k in REPORTED} if kept == "refit" and m
                             else chosen.get("test"))})
  i = seeds.index(int(config.seed))
  chosen_refit = entries[i]["kept"] == "refit"
  if chosen_refit:
    before_writing(f"after the refit, before writing {run_dir}")
    state = jax.device_get(seeds_lib.seed_state(states, i))
    steps = int(config.num_epochs) * run.steps_per_epoch
    paths.publish_folder(run_dir, functools.partial(
        restore.save_variables_as_run, variables={"params": state.params,
                                                  "batch_stats": state.batch_stats},
        config=config, best={"selected_on": "last", "metric": "step", "value": float(steps),
                             "refit_epoch": int(config.num_epochs),
                             "test": entries[i]["test"]}))
  return {"seeds": entries, "epochs": int(config.num_epochs), "chosen_refit": chosen_refit,
          "refit_seeds": sum(e["kept"] == "refit" for e in entries),
          "seconds": float(sum(h["seconds"] for h in history)),
          "summary": {"test": {k: _summary([(e["test"] or {}).get(k) for e in entries])
                               for k in REPORTED}}}


def _refit_text(refit: Mapping[str, Any]) -> str:
  test = refit["summary"]["test"]
  n = len(refit["seeds"])
  kept = ("every seed its refit" if refit["refit_seeds"] == n else
          f"{refit['refit_seeds']} of {n} seeds their refit, the others their selected state")
  return (f"unimodal {_cell(test['unimodal_map_average'])}, paired "
          f"{_cell(test['map_average'])} (mean over seeds; {kept})")


def margin(rows: Sequence[Mapping[str, Any] | None], scores: Sequence[float | None], top: int,
           metric: str, overrides: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
  """How clearly the validation split chose configuration ``top``: the runner-up (the next
  best mean score; ``runner_up_differs``: its values where they differ from the chosen
  one's), and seed by seed the chosen configuration's score minus the runner-up's (members of
  one seed start from the same weights, so the per-seed difference is the paired
  comparison). ``preferred_by`` counts the seeds whose difference is positive: when it is not
  every seed, the split did not separate the two and the choice between them is a toss-up
  (with one seed, nothing tells). None with a single configuration."""
  runner = _argmax([None if i == top else v for i, v in enumerate(scores)])
  if runner is None:
    return None
  differs = {k: v for k, v in overrides[runner].items()
             if k not in overrides[top] or overrides[top][k] != v}
  a, b = (_seed_scores(rows[i]["seeds"], rows[i]["score_split"], metric) for i in (top, runner))
  diffs = {seed: a[seed] - b[seed] for seed in a
           if a[seed] is not None and b.get(seed) is not None and np.isfinite(a[seed] - b[seed])}
  return {"runner_up": runner, "runner_up_differs": differs,
          "mean": float(scores[top] - scores[runner]),
          "per_seed": {str(k): float(v) for k, v in diffs.items()},
          "preferred_by": sum(v > 0 for v in diffs.values()), "seeds": len(diffs)}


def margin_text(m: Mapping[str, Any] | None) -> str:
  """``margin``'s result in words (one line)."""
  if not m:
    return "the only configuration"
  if not m["seeds"]:
    detail = "no seed finished both"
  elif m["seeds"] == 1:
    detail = (f"one seed, {next(iter(m['per_seed'].values())):+.4f}: more seeds would tell "
              "whether the choice holds")
  else:
    verdict = ("every seed prefers it" if m["preferred_by"] == m["seeds"] else
               f"{m['preferred_by']} of {m['seeds']} seeds prefer it: within the seeds' noise")
    detail = ("per seed " + ", ".join(f"{v:+.4f}" for v in m["per_seed"].values())
              + f"; {verdict}")
  return (f"over configuration {m['runner_up']} ({_label(m['runner_up_differs'])}) by "
          f"{m['mean']:+.4f} ({detail})")


def config_file(config: ml_collections.ConfigDict, report: dict[str, Any]) -> str:
  """A config file ``main`` trains: the chosen configuration, every field, as JSON."""
  text = json.dumps(json.loads(config.to_json_best_effort()), indent=1, sort_keys=True)
  index = report["chosen"]["config"]
  refit = ("\nRefit: trained on train + validation (data.validation_fraction=0), the final "
           "state kept\n(selection_split='last'), as chosen/ was.\n"
           if (report.get("refit") or {}).get("chosen_refit") else "")
  return (f'"""The configuration `python -m dsf3n_jax.sweep` chose: configuration {index} '
          f'({_label(report["overrides"][index])}),\nseed {int(config.seed)}, on '
          f'{report["chosen"]["selected_on"]}.\n{refit}\nCommand: {report["command"]}\n'
          f'Train it again: python -m dsf3n_jax.main --config=<this file> --workdir=DIR\n"""\n\n'
          "import json\n\nimport ml_collections\n\n"
          f'CONFIG = json.loads(r"""{text}""")\n\n\n'
          "def get_config(arg=None):\n"
          "  if arg:\n"
          "    raise ValueError(f\"this config takes no variants, got {arg!r}\")\n"
          "  config = ml_collections.ConfigDict(CONFIG)\n"
          "  for key in ('kernel_sizes', 'branch_features'):  # tuples in the defaults\n"
          "    config.model[key] = tuple(config.model[key])\n"
          "  return config\n")


def _label(overrides: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the config as given"


def _load(path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text()) if path.exists() else {}
  except (OSError, json.JSONDecodeError):
    return {}


def _machine() -> str:
  import jax
  d = jax.devices()[0]
  return f"{len(jax.devices())} x {d.device_kind} ({jax.default_backend()}), {os.cpu_count()} cpus"


def _cell(summary: Mapping[str, Any] | None) -> str:
  if not summary or summary.get("mean") is None:
    return "-"
  return f"{summary['mean']:.4f} ± {summary['std']:.4f}"


def markdown(report: dict[str, Any]) -> str:
  """``sweep.md``: every configuration, validation and test, both protocols."""
  metric = report["metric"]
  chosen = report.get("chosen") or {}
  on_test = any(row is not None and row.get("score_split") == "test"
                for row in report.get("configs") or [])
  chosen_on = ("test (no validation split: data.validation_fraction=0)" if on_test
               else "validation")
  lines = ["# Sweep", "",
           f"- Command: `{report['command']}`",
           f"- Seeds {report['seeds']}; each member's state: the best of its evaluations on "
           f"{chosen_on} by its config's selection metric; the configuration chosen by "
           f"{'test' if on_test else 'validation'} `{metric}`, mean over seeds (± the population "
           "std, ddof=0). "
           + ("**Selected on test: the test columns are the scores the choice was made on, "
              "not held-out results.**" if on_test
              else "Test is reported, not used to choose."),
           f"- Machine: {report.get('machine', '?')}; {report.get('seconds', 0) / 60:.1f} min "
           "of training and evaluation in this process (groups kept from earlier runs not "
           "counted)",
           f"- Chosen: configuration {chosen.get('config', '-')}, seed {chosen.get('seed', '-')}"
           f" (`chosen_config.py`, run `chosen/`), {margin_text(chosen.get('margin'))}"
           if chosen else "- Chosen: none finished",
           *([f"- Refit of the chosen configuration on train + validation, "
              f"{report['refit']['epochs']} epochs, the final state of each seed (a seed whose "
              "refit fits its validation pairs worse than its selected state scored on them "
              f"held out keeps the selected state): test {_refit_text(report['refit'])}; per "
              "seed, unimodal "
              + ", ".join(("-" if s["test"] is None else f"{s['test']['unimodal_map_average']:.4f}")
                          + ("" if s["kept"] == "refit" else " (selected)")
                          for s in report["refit"]["seeds"])
              + f". `chosen/` is seed {chosen.get('seed', '-')}'s "
              + ("refit." if report["refit"]["chosen_refit"] else "selected state.")]
             if report.get("refit") else []),
           "",
           "| # | configuration | validation unimodal | validation paired | test unimodal | "
           "test paired | epochs selected |",
           "|---|---|---|---|---|---|---|"]
  for i, row in enumerate(report.get("configs") or []):
    label = _label(report["overrides"][i])
    if row is None:
      lines.append(f"| {i} | {label} | - | - | - | - | - |")
      continue
    s = row["summary"]
    mark = " **(chosen)**" if chosen.get("config") == i else ""
    epochs = ", ".join(str(x["epoch"]) for x in row["seeds"])
    lines.append(f"| {i} | {label}{mark} | {_cell(s['validation']['unimodal_map_average'])} | "
                 f"{_cell(s['validation']['map_average'])} | "
                 f"{_cell(s['test']['unimodal_map_average'])} | {_cell(s['test']['map_average'])}"
                 f" | {epochs} |")
  lines += ["", "mAP, cosine, average of both directions; mean ± standard deviation over the "
            "seeds that finished finite."]
  return "\n".join(lines) + "\n"


# -- command line -------------------------------------------------------------------------------


def main(argv):
  if len(argv) > 1:
    raise main_lib.cli.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from absl import logging

  from dsf3n_jax import config_check, train
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not FLAGS.sweep:
    raise main_lib.cli.UsageError("--sweep: required (default, PATH=V1,V2;... or a .json file)")
  if FLAGS.metric not in METRICS:
    raise main_lib.cli.UsageError(f"--metric={FLAGS.metric}: expected one of "
                                  f"{', '.join(METRICS)}")
  try:
    overrides = parse_sweep(FLAGS.sweep)
    seeds = [int(s) for s in FLAGS.seeds.split(",") if s.strip()]
  except ValueError as e:
    raise main_lib.cli.UsageError(str(e) if "--" in str(e) else f"--seeds: {e}") from e
  config = FLAGS.config
  config_check.check_unknown_fields(config, train.default_config())
  if str(config.model.dtype) == "float64":
    import jax
    jax.config.update("jax_enable_x64", True)
  main_lib.use_compilation_cache()
  command = "python -m dsf3n_jax.sweep " + " ".join(sys.argv[1:])
  try:
    report = run_sweep(config, overrides, seeds, FLAGS.workdir, metric=FLAGS.metric,
                       refit=FLAGS.refit, command=command)
  except ValueError as e:
    if str(e).startswith("--"):
      raise main_lib.cli.UsageError(str(e)) from e
    raise
  print(markdown(report))
  print(f"sweep: {os.path.join(FLAGS.workdir, 'sweep.json')}")


if __name__ == "__main__":
  main_lib.run(main)
