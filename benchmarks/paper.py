"""The paper's tables on one dataset, in one command, over seeds, for both protocols.

  python -m benchmarks.paper --data=fsdd                 # ../shared/data/fsdd_digits.npz
  python -m benchmarks.paper --data=synthetic --quick --seeds=2
  python -m benchmarks.paper --data=FILE.npz --seeds=5 --epochs=10 --set=optim.lr=3e-4
  python -m benchmarks.paper --data=fsdd --seeds=1 --only=swept_recipe --out=DIR \
      --sweep='model.input_noise=0.0,0.5;optim.lr=1e-3,3e-3'   # another search space

``--data``: synthetic, fsdd, vegas, ave (TFDS, prepared as in the README) or a
paired-feature file. Writes ``paper-<data>[-quick].json`` and ``.md`` (default
benchmarks/results/) with:

- Table I/II, comparison methods on features alone: linear CCA, kernel CCA
  (random Fourier features), deep CCA, cluster CCA, semantic matching
  (logistic regression, MLP), all unimodal by construction; DSF3N with the
  data's config (``configs/<data>.py``: the paper's model and losses, the
  data's optimiser budget), with its ``:unimodal`` recipe, and with
  ``configs/paired_features.py:unimodal`` (the recipe for new data) swept
  (``python -m dsf3n_jax.sweep --sweep=default`` on top of it, with the data's
  own data section: the configuration chosen on validation, then refit on train
  + validation; quick mode: the sweep's first two; ``--sweep``: another search
  space), both protocols.
- Table III/IV, the ablations: every combination of the identity loss (J_dis,
  ``loss.terms.id``), the centre loss (J_intra, ``loss.terms.center``) and MFA
  (``model.fusion_kw.num_stages=0``) except the one with none of them: seven rows. The pair
  term stays in every row, so the row with neither loss trains on the pair
  term alone (its centres get no gradient).
- Fig. 3: t-SNE of the test split (raw features, and the full model's
  embeddings in both protocols) for its seed with the best validation mAP.

Every number is the test split at the last epoch (no checkpoint selection),
mean and standard deviation over the seeds (0 .. seeds-1); except the swept row:
each seed's best state on validation, the configuration chosen by its mean
validation ``unimodal_map_average``, then trained again on train + validation
(each seed's final state: the row's test numbers; the selected states' test is
kept as ``selection_test``). The seeds of a
DSF3N row train together as one compiled program (``dsf3n_jax.training.seeds``).
Each finished row is saved at once; a rerun skips the rows whose config, seeds
and code-relevant settings are unchanged.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import pathlib
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from benchmarks import accuracy, baselines, sysinfo
from benchmarks.paper_report import (
    ABLATIONS,
    PROTOCOLS,
    Ablation,
    Progress,
    cell,
    markdown,
    ordering,
    write,
)
from dsf3n_jax.training.workdir import WorkdirLock

RESULTS = accuracy.RESULTS
DIRECTIONS = accuracy.DIRECTIONS
TFDS_DATA = ("vegas", "ave")
# Epochs of the :small model, the grid's budget on synthetic, fsdd and files (unless
# --full_model): 30 epochs of configs/fsdd.py:unimodal,small reached 0.957 ± 0.009 unimodal
# mAP over seeds 0-4 (benchmarks/results/paper-fsdd.md).
CPU_EPOCHS = 30
REFIT = True  # the swept row: the chosen configuration trained again on train + validation
# The paper's published test mAP (average of both directions) per dataset and row key. This
# project does not hold the paper's tables: add them here to print them beside ours.
PUBLISHED: dict[str, dict[str, float]] = {}


BASELINES = {
    "linear_cca": ("linear CCA", baselines.fit_linear_cca),
    "kernel_cca": ("kernel CCA (RBF, random Fourier features)", baselines.fit_kernel_cca),
    "deep_cca": ("deep CCA", baselines.fit_deep_cca),
    "cluster_cca": ("cluster CCA", baselines.fit_cluster_cca),
    "semantic_linear": ("semantic matching, logistic regression",
                        lambda *a, **k: baselines.fit_semantic(*a, kind="linear", **k)),
    "semantic_mlp": ("semantic matching, MLP",
                     lambda *a, **k: baselines.fit_semantic(*a, kind="mlp", **k)),
}


class Row(NamedTuple):
  key: str
  table: str  # "comparison" (Tables I/II) or "ablation" (Tables III/IV)
  name: str
  kind: str  # "baseline" or "dsf3n"
  config: Any  # a DSF3N row's ConfigDict; None for baselines
  sweep: Any = None  # a swept row's configurations (dsf3n_jax.sweep overrides)


# -- configs ------------------------------------------------------------------------------------


def parse_set(items: Sequence[str]) -> dict[str, Any]:
  """``--set=path=value`` items -> {path: value} (values as Python literals, else strings)."""
  out = {}
  for item in items:
    path, sep, text = item.partition("=")
    if not sep or not path:
      raise SystemExit(f"--set={item!r}: expected FIELD=VALUE, e.g. --set=optim.lr=3e-4")
    try:
      out[path] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[path] = text
  return out


def _apply(config, overrides: dict[str, Any]):
  for path, value in overrides.items():
    *parents, last = path.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise SystemExit(f"--set={path}: config has no field {p!r}")
      node = node[p]
    if last not in node:
      raise SystemExit(f"--set={path}: config has no field {last!r}")
    node[last] = value
  return config


def base_config(data: str, *, unimodal: bool, quick: bool, epochs: int | None,
                overrides: dict[str, Any], full_model: bool = False, recipe: str | None = None):
  """``configs/<data module>.py`` with the grid's budget, then ``overrides``.

  The budget: ``:runlocal,tiny`` when quick; on vegas and ave (or ``full_model``)
  the data config as it stands; otherwise (synthetic, fsdd, files) the
  ``:small`` model for ``CPU_EPOCHS`` epochs. ``unimodal`` adds ``:unimodal``.
  ``recipe``: another config module's recipe with the data's own data section.
  """
  path = pathlib.Path(data)
  module = recipe or (data if data in ("synthetic", "fsdd", *TFDS_DATA) else "paired_features")
  small = not quick and not full_model and module not in TFDS_DATA
  variants = [*(["unimodal"] if unimodal else []), *(accuracy.QUICK_VARIANTS if quick else []),
              *(["small"] if small else [])]
  config = accuracy.load_config(module, ",".join(variants))
  if recipe is not None:  # the data's own data section under the other recipe
    config.data = base_config(data, unimodal=unimodal, quick=quick, epochs=epochs,
                              overrides=overrides, full_model=full_model).data
  elif module == "paired_features":
    config.data.path = str(path.resolve())
  if small:
    config.num_epochs = CPU_EPOCHS
  if epochs is not None:
    config.num_epochs = epochs
  config = _apply(config, overrides)
  if not config.data.validation_fraction:
    config.data.validation_fraction = 0.1  # Fig. 3's seed is chosen on validation
  return config


def ablation_config(base, ablation: Ablation):
  config = base.copy_and_resolve_references()
  config.loss.terms.id = 1.0 if ablation.dis else 0.0
  if not ablation.intra:
    config.loss.terms.center = 0.0
  if not ablation.mfa:
    config.model.fusion_kw.num_stages = 0  # fused = fine-grained
  return config


def plan_rows(data: str, *, sweep: str = "default", **budget) -> list[Row]:
  """Every row of the run, in order (the full model first of the DSF3N rows); ``sweep``: the
  swept row's ``--sweep`` (``dsf3n_jax.sweep.parse_sweep``)."""
  base = base_config(data, unimodal=False, **budget)
  rows = [Row(k, "comparison", name, "baseline", None) for k, (name, _) in BASELINES.items()]
  rows += [Row(a.key, "ablation", a.name, "dsf3n", ablation_config(base, a)) for a in ABLATIONS]
  rows.append(Row("unimodal_recipe", "comparison", "DSF3N, :unimodal recipe", "dsf3n",
                  base_config(data, unimodal=True, **budget)))
  rows.append(Row("swept_recipe", "comparison",
                  "DSF3N, paired_features :unimodal recipe swept "
                  f"({'default sweep' if sweep == 'default' else 'sweep ' + sweep}, chosen on "
                  "validation, refit on train + validation)", "dsf3n",
                  # paired_features: the recipe for data it was not tuned on (vegas and ave
                  # keep their own; a file's is paired_features already)
                  base_config(data, unimodal=True, **budget,
                              recipe=None if data in TFDS_DATA else "paired_features"),
                  sweep=swept_configurations(budget["quick"], budget["epochs"], sweep)))
  return rows


def swept_configurations(quick: bool, epochs: int | None = None,
                         spec: str = "default") -> list[dict[str, Any]]:
  """The swept row's configurations: those of ``dsf3n_jax.sweep --sweep=SPEC`` (quick: the
  first two). Quick mode and ``--epochs`` keep the row at the grid's epochs: the sweep's
  ``num_epochs`` is left out."""
  from dsf3n_jax import sweep
  configs = sweep.parse_sweep(spec)
  if quick or epochs is not None:
    configs = [{k: v for k, v in c.items() if k != "num_epochs"} for c in configs]
  return configs[:2] if quick else configs


def fingerprint(row: Row, seeds: Sequence[int], quick: bool) -> str:
  """What a saved row must match to be reused: its config (or method), seeds and budget."""
  what = {"key": row.key, "seeds": list(seeds), "quick": quick,
          "config": None if row.config is None else json.loads(row.config.to_json_best_effort()),
          # the refit's rule by name: rows of an earlier rule (unguarded) run again
          **({"sweep": row.sweep, "refit": "guarded" if REFIT else None}
             if row.sweep is not None else {})}
  return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


# -- rows ---------------------------------------------------------------------------------------


def summarise(per_seed: list[dict[str, float] | None]) -> dict[str, Any]:
  """Mean and (population) standard deviation over the seeds that finished finite."""
  good = [s for s in per_seed if s is not None]
  out: dict[str, Any] = {"seeds_used": len(good), "seeds_failed": len(per_seed) - len(good)}
  for stat, fn in (("mean", np.mean), ("std", np.std)):
    out[stat] = {k: (float(fn([s[k] for s in good])) if good else None) for k in DIRECTIONS}
  out["per_seed"] = per_seed
  return out


def baseline_arrays(config) -> dict[str, Any]:
  """Standardised train rows (the validation carve removed) and test split of ``config``."""
  from dsf3n_jax import input_pipeline as ip
  from dsf3n_jax import train
  sources = train.load_data(config)
  if config.data.normalize != "standardize":
    sources = ip.standardize(sources)
  return {"train": ip.load_split_arrays(sources.train), "test": ip.load_split_arrays(sources.test),
          "num_classes": sources.num_classes}


# Baselines in closed form, whose fit takes no seed (``baselines.fit_linear_cca`` and
# ``fit_cluster_cca`` ignore it): fitted once, their score is every seed's (the same numbers a
# fit per seed gives, without an eigendecomposition of the visual covariance per seed).
SEED_FREE = frozenset({"linear_cca", "cluster_cca"})


def run_baseline(row: Row, arrays, seeds, quick: bool, progress) -> dict[str, Any]:
  _, fit = BASELINES[row.key]
  per_seed, details, t0 = [], [], time.perf_counter()
  for i, seed in enumerate(seeds):
    progress(f"{row.key}: seed {seed} ({i + 1}/{len(seeds)})")
    if per_seed and row.key in SEED_FREE:
      per_seed.append(dict(per_seed[0]))
      continue
    v, a, d = fit(arrays["train"], arrays["test"], num_classes=arrays["num_classes"],
                  seed=seed, quick=quick)
    per_seed.append(accuracy.score(v, a, arrays["test"]["label"]))
    details.append(d)
  return {"protocols": {"unimodal": summarise(per_seed)}, "train_s": time.perf_counter() - t0,
          "details": details[0]}


def _protocol_values(metrics: dict[str, float] | None, protocol: str):
  prefix = accuracy.PROTOCOL_KEYS[protocol]
  return None if metrics is None else {k: metrics[prefix + k] for k in DIRECTIONS}


def run_swept(row: Row, seeds, progress) -> dict[str, Any]:
  """``dsf3n_jax.sweep`` of the row's configurations; the chosen one's numbers per seed."""
  import tempfile

  from dsf3n_jax import sweep
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="paper-sweep-") as workdir:
    report = sweep.run_sweep(row.config, row.sweep, seeds, workdir, command="benchmarks.paper",
                             refit=REFIT, log=lambda m: progress(f"{row.key}: {m}"))
  chosen = report["chosen"]
  if chosen is None:
    raise RuntimeError("no configuration of the sweep finished finite")
  per_seed = report["configs"][chosen["config"]]["seeds"]
  refit = report.get("refit")
  test = refit["seeds"] if refit else per_seed  # the refit's final states, when there is one
  return {"protocols": {p: summarise([_protocol_values(s["test"], p) for s in test])
                        for p in PROTOCOLS},
          "validation": {p: summarise([_protocol_values(s["validation"], p) for s in per_seed])
                         for p in PROTOCOLS},
          **({"selection_test": {p: summarise([_protocol_values(s["test"], p) for s in per_seed])
                                 for p in PROTOCOLS}} if refit else {}),
          "train_s": time.perf_counter() - t0,
          "chosen": {"overrides": chosen["overrides"], "selected_on": chosen["selected_on"],
                     "epochs": [s["epoch"] for s in per_seed], "margin": chosen["margin"],
                     "refit": refit is not None,
                     **({"refit_seeds": refit["refit_seeds"]} if refit else {})},
          "sweep": [{"overrides": report["overrides"][i],
                     "validation_unimodal": (r or {}).get("summary", {}).get(
                         "validation", {}).get("unimodal_map_average"),
                     "test_unimodal": (r or {}).get("summary", {}).get(
                         "test", {}).get("unimodal_map_average")}
                    for i, r in enumerate(report["configs"])]}


def run_dsf3n(row: Row, seeds, progress) -> dict[str, Any]:
  import jax

  from dsf3n_jax.training import seeds as seeds_lib
  epochs, t0 = row.config.num_epochs, time.perf_counter()

  def on_epoch(epoch, means, seconds):
    progress(f"{row.key}: epoch {epoch}/{epochs} of {len(seeds)} seeds together "
             f"({seconds:.0f} s/epoch), loss " + " ".join(f"{x:.3f}" for x in means["loss"]),
             done_fraction=epoch / epochs)

  run, states, history = seeds_lib.train_seeds(row.config, seeds, on_epoch=on_epoch)
  train_s = time.perf_counter() - t0
  test = seeds_lib.evaluate_seeds(run, states, "test")
  validation = (seeds_lib.evaluate_seeds(run, states, "validation")
                if run.sources.validation is not None else [None] * len(seeds))
  return {"protocols": {p: summarise([_protocol_values(m, p) for m in test]) for p in PROTOCOLS},
          "validation": {p: summarise([_protocol_values(m, p) for m in validation])
                         for p in PROTOCOLS},
          "train_s": train_s, "seconds_per_epoch": [h["seconds"] for h in history],
          "final_train_loss": history[-1]["loss"],
          "num_params": int(sum(np.size(x) for x in jax.tree.leaves(
              seeds_lib.seed_state(states, 0).params))),
          "_run": run, "_states": states}


# -- Fig. 3 -------------------------------------------------------------------------------------


def figure(full: dict[str, Any], arrays, seeds, out_dir: pathlib.Path, stem: str):
  """t-SNE of the test split for the full model's seed with the best validation mAP."""
  from dsf3n_jax import visualize
  from dsf3n_jax.training import seeds as seeds_lib
  from dsf3n_jax.training import steps as steps_lib
  run, states = full["_run"], full["_states"]
  scores = [(s or {}).get("average", -1.0) for s in full["validation"]["paired"]["per_seed"]]
  best = int(np.argmax(scores))
  state = seeds_lib.seed_state(states, best)
  emb = steps_lib.embed_split(steps_lib.make_embed_fn(run.model, run.mesh), state.variables,
                              run.sources.test, mesh=run.mesh,
                              batch_size=run.config.eval_batch_size)
  rows = visualize.subsample(emb["label"], max_points=1000, seed=0)
  labels = emb["label"][rows]
  test = arrays["test"]
  files = {}
  planes = {"raw_features": (test["visual"][emb["index"][rows]],
                             test["audio"][emb["index"][rows]], "raw"),
            "embeddings_paired": (emb["emb_visual"][rows], emb["emb_audio"][rows], "embedding"),
            "embeddings_unimodal": (emb["unimodal_emb_visual"][rows],
                                    emb["unimodal_emb_audio"][rows], "embedding")}
  for name, (v, a, kind) in planes.items():
    xy_v, xy_a = visualize.joint_tsne(v, a, seed=0, kind=kind)
    path = out_dir / f"{stem}-fig3-{name}.png"
    visualize.plot_plane(xy_v, xy_a, labels, path=path,
                         title=f"{name.replace('_', ' ')} (test, seed {seeds[best]})")
    files[name] = path.name
  return {"seed": seeds[best], "selected_on": "validation paired map_average", "files": files}


# -- the run ------------------------------------------------------------------------------------


def load_previous(path: pathlib.Path) -> dict[str, Any]:
  """An earlier run's report at ``path`` ({} when absent or unreadable)."""
  if not path.exists():
    return {}
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    print(f"note: {path} unreadable ({e}); every row runs again", file=sys.stderr)
    return {}


def _new_doc(name, seeds, quick, arrays, earlier, previous, *, command, base):
  """The report's header: data, seeds, protocol, machine; rows are appended as they finish."""
  return {"benchmark": "paper", "data": name, "quick": quick,
          "data_source": base.data.path or base.data.name,
          "seeds": list(seeds), "report_split": "test", "selection": "none: the last epoch",
          "metric": "mAP, cosine, all items", "command": command,
          "started": sysinfo.machine_info()["date"], "machine": sysinfo.machine_info(),
          "first_started": earlier.get("first_started") or earlier.get("started")
          if previous else None,
          "accelerator": sysinfo.accelerator_info(), "versions": sysinfo.versions(),
          "num_classes": arrays["num_classes"], "train_examples": len(arrays["train"]["label"]),
          "test_examples": len(arrays["test"]["label"]),
          "published": PUBLISHED.get(name), "rows": [],
          "figure_3": earlier.get("figure_3") if "full" in previous else None}


def _run_row(row: Row, fp: str, arrays, seeds, quick: bool, progress, doc, *, figures: bool,
             out_dir: pathlib.Path, stem: str) -> dict[str, Any]:
  """One row's entry (a failure is recorded in it; the other rows still run)."""
  entry = {"key": row.key, "table": row.table, "name": row.name, "kind": row.kind,
           "fingerprint": fp, "error": None,
           "config": (None if row.config is None
                      else json.loads(row.config.to_json_best_effort()))}
  try:
    result = (run_baseline(row, arrays, seeds, quick, progress) if row.kind == "baseline"
              else run_swept(row, seeds, progress) if row.sweep is not None
              else run_dsf3n(row, seeds, progress))
    if row.key == "full" and figures:
      doc["figure_3"] = figure(result, arrays, seeds, out_dir, stem)
      entry["has_figure"] = True
    entry.update({k: v for k, v in result.items() if not k.startswith("_")})
  except Exception as e:  # noqa: BLE001 - a failed row is recorded, the others still run
    entry.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
  return entry


def run(data: str, *, seeds: Sequence[int], quick: bool, out_dir: pathlib.Path,
        epochs: int | None = None, overrides: dict[str, Any] | None = None,
        full_model: bool = False, only: Sequence[str] = (), figures: bool = True,
        command: str = "", sweep: str = "default",
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or reuses) every row; writes the JSON and Markdown after each one."""
  if len(seeds) < 1:
    raise SystemExit("--seeds: expected at least 1")
  named = data in ("synthetic", "fsdd", *TFDS_DATA)
  name = data if named else pathlib.Path(data).stem
  budget = dict(quick=quick, epochs=epochs, overrides=overrides or {}, full_model=full_model)
  planned = plan_rows(data, sweep=sweep, **budget)
  unknown = [o for o in only if all(o not in (r.key, r.table) for r in planned)]
  if unknown:
    raise SystemExit(f"--only={','.join(unknown)}: no such row or table; rows: "
                     f"{', '.join(r.key for r in planned)}; tables: comparison, ablation")
  rows = [r for r in planned if not only or r.key in only or r.table in only]
  stem = f"paper-{name}" + ("-quick" if quick else "")
  out_dir.mkdir(parents=True, exist_ok=True)
  # One writer per report: a second run into the same folder and report is refused, and a
  # run whose lease lapsed and whose report another run took over writes nothing more.
  lock = WorkdirLock(out_dir, name=f".{stem}.lock", flag="--out")
  lock.acquire()
  try:
    return _run_rows(data, name, stem, planned, rows, seeds=seeds, quick=quick,
                     out_dir=out_dir, budget=budget, figures=figures, command=command, log=log,
                     before_writing=lock.raise_if_lost)
  finally:
    lock.release()


def _run_rows(data, name, stem, planned, rows, *, seeds, quick, out_dir, budget, figures,
              command, log, before_writing) -> dict[str, Any]:
  earlier = load_previous(out_dir / f"{stem}.json")
  previous = {r["key"]: r for r in earlier.get("rows", []) if not r.get("error")}
  base = base_config(data, unimodal=False, **budget)
  arrays = baseline_arrays(base)
  doc = _new_doc(name, seeds, quick, arrays, earlier, previous, command=command, base=base)
  progress, t0 = Progress(rows, log), time.perf_counter()
  selected = {r.key for r in rows}
  for row in planned:
    if row.key not in selected:  # not selected by --only: an earlier result stays in the report
      if row.key in previous:
        doc["rows"].append(previous[row.key])
      continue
    fp = fingerprint(row, seeds, quick)
    if row.key in previous and previous[row.key].get("fingerprint") == fp and not (
        figures and row.key == "full" and not previous[row.key].get("has_figure")):
      doc["rows"].append(previous[row.key])
      progress.finish(row.key, skipped=True)
      log(f"{row.key}: unchanged since the last run, kept")
      continue
    progress.start(row.key)
    progress(f"{row.key}: {row.name}")
    entry = _run_row(row, fp, arrays, seeds, quick, progress, doc, figures=figures,
                     out_dir=out_dir, stem=stem)
    entry["row_s"] = time.perf_counter() - progress.row_t0
    progress.finish(row.key)
    doc["rows"].append(entry)
    doc["ordering"] = ordering(doc)
    doc["wall_s"] = time.perf_counter() - t0
    doc["rows_s"] = sum(r.get("row_s", 0.0) for r in doc["rows"])
    # A run whose report another run took over (its lease lapsed) writes nothing more.
    before_writing(f"after row {row.key}, before writing {stem}.json")
    write(doc, out_dir, stem)
    log(f"{row.key}: " + ("FAILED " + entry["error"].splitlines()[0] if entry["error"] else
                          "; ".join(f"{p} {cell(entry, p)}" for p in entry["protocols"])))
  doc["wall_s"] = time.perf_counter() - t0
  doc["rows_s"] = sum(r.get("row_s", 0.0) for r in doc["rows"])
  doc["ordering"] = ordering(doc)
  before_writing(f"before writing {stem}.json")
  write(doc, out_dir, stem)
  return doc


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.paper", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", required=True,
                      help="synthetic, fsdd, vegas, ave or a paired-feature .npz/.h5 file")
  parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 (default 5)")
  parser.add_argument("--quick", action="store_true",
                      help="DSF3N configs get ':runlocal,tiny'; baselines shorter")
  parser.add_argument("--epochs", type=int, default=None, help="every DSF3N row's num_epochs")
  parser.add_argument("--full_model", action="store_true",
                      help="the data config's model (default on synthetic, fsdd and files: "
                      f":small for {CPU_EPOCHS} epochs; vegas and ave: always their config)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="a config field of every DSF3N row (repeatable)")
  parser.add_argument("--only", action="extend", default=[],
                      type=lambda v: [o for o in v.split(",") if o],
                      help="rows (keys) or tables (comparison, ablation) to run (repeatable, "
                      "or comma-separated)")
  parser.add_argument("--sweep", default="default",
                      help="the swept row's configurations, as dsf3n_jax.sweep's --sweep")
  parser.add_argument("--no_figures", action="store_true", help="skip Fig. 3's t-SNE")
  parser.add_argument("--out", default=None, help=f"output folder (default {RESULTS})")
  raw = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(raw)
  data = args.data
  if data not in ("synthetic", "fsdd", *TFDS_DATA) and not pathlib.Path(data).exists():
    raise SystemExit(f"--data={data}: not synthetic, fsdd, vegas or ave, and no such file")
  if data == "fsdd" and not accuracy.FSDD_PATH.exists():
    raise SystemExit(f"--data=fsdd: {accuracy.FSDD_PATH} is absent (shared/data/README.md)")
  try:
    swept_configurations(args.quick, args.epochs, args.sweep)
  except ValueError as e:
    raise SystemExit(str(e)) from None
  log = lambda s: print(time.strftime("%H:%M:%S "), s, file=sys.stderr, flush=True)
  out_dir = pathlib.Path(args.out) if args.out else RESULTS
  doc = run(data, seeds=list(range(args.seeds)), quick=args.quick, out_dir=out_dir,
            epochs=args.epochs, overrides=parse_set(args.set), full_model=args.full_model,
            only=args.only, sweep=args.sweep,
            figures=not args.no_figures, log=log,
            command=" ".join(["python -m benchmarks.paper", *raw]))
  print(markdown(doc))
  failed = [r["key"] for r in doc["rows"] if r.get("error")]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
