"""Accuracy benchmark: test-split mAP of linear baselines and DSF3N on paired-feature data.

  python -m benchmarks.accuracy            # synthetic, and ../shared/data/fsdd_digits.npz
  python -m benchmarks.accuracy --data=FILE.npz --data=fsdd --out DIR --seed 1
  python -m benchmarks.accuracy --data=synthetic --quick   # DSF3N: ":runlocal,tiny", 1 epoch
  python -m benchmarks.accuracy --data=fsdd --only=baselines

Rows (``dsf3n_jax.metrics.cross_modal_map``: cosine distance, every test item ranked):
linear CCA and semantic matching (logistic regression, MLP), which embed each item from
its own modality ("unimodal" protocol); DSF3N with the paper's recipe (configs/default.py)
and with ``<config>:unimodal``, each read under the "paired" protocol (each item embedded
with its pair, the paper's) and the "unimodal" one. Baselines fit on the rows DSF3N's
paper recipe trains on, standardised with train statistics. Writes
``accuracy-<data>[-quick].json`` and ``.md`` per dataset under benchmarks/results/ (or
``--out``); a failed row is recorded with its error, the others still run.

``--quick`` checks the machinery, not accuracy: every row and both protocols are run and
written, but DSF3N trains ``:runlocal,tiny`` for ``QUICK_EPOCHS`` epoch (about chance on the
synthetic data; the tests' quick run, tests/test_accuracy_benchmark.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from benchmarks import baselines, sysinfo

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FSDD_PATH = REPO.parent / "shared" / "data" / "fsdd_digits.npz"
DIRECTIONS = ("audio_to_visual", "visual_to_audio", "average")
# Protocol -> prefix of the keys of train.evaluate's metrics.
PROTOCOL_KEYS = {"paired": "map_", "unimodal": "unimodal_map_"}
QUICK_VARIANTS = ("runlocal", "tiny")
# Epochs of a quick DSF3N row (runlocal's 2 ran the same code for a second epoch and a second
# evaluation, and took 5-7 s more of a 2-core host's CPU in the quick test).
QUICK_EPOCHS = 1


class Dataset(NamedTuple):
  name: str  # file-name stem: synthetic, fsdd, or the file's stem
  path: str | None  # None: the built-in synthetic data
  config_module: str  # configs/<module>.py holds its own (unimodal) recipe


class Context(NamedTuple):
  dataset: Dataset
  quick: bool
  seed: int
  arrays: dict[str, Any]  # standardised "train"/"test" splits and sizes (baseline_arrays)


def resolve_datasets(values: Sequence[str]) -> list[Dataset]:
  """``--data`` values -> datasets; no value: synthetic, and fsdd when its file exists."""
  if not values:
    values = ["synthetic", "fsdd"]
    if not FSDD_PATH.exists():
      print(f"note: skipping fsdd, {FSDD_PATH} is absent (shared/data/README.md)", file=sys.stderr)
      values = ["synthetic"]
  out: list[Dataset] = []
  for value in values:
    named = {"synthetic": Dataset("synthetic", None, "synthetic"),
             "fsdd": Dataset("fsdd", str(FSDD_PATH), "fsdd")}
    path = pathlib.Path(value)
    ds = named.get(value, Dataset(path.stem, str(path.resolve()), "paired_features"))
    if ds.path is not None and not os.path.exists(ds.path):
      raise SystemExit(f"--data={value}: file {ds.path} not found")
    if any(d.name == ds.name for d in out):  # two files of the same name
      ds = ds._replace(name=f"{ds.name}-{len(out)}")
    out.append(ds)
  return out


def load_config(module: str, variants: str):
  """``configs/<module>.py``'s ``get_config(variants)`` (comma-separated variant names)."""
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # configs do ``from configs import default``
  return importlib.import_module(f"configs.{module}").get_config(variants or None)


def _variants(quick: bool, *names: str) -> str:
  return ",".join([*names, *(QUICK_VARIANTS if quick else ())])


def dsf3n_config(dataset: Dataset, recipe: str, *, quick: bool, seed: int | None):
  """(config, description) of a DSF3N row's recipe; ``seed=None``: (None, description)."""
  module, v = (("default", _variants(quick)) if recipe == "paper"
               else (dataset.config_module, _variants(quick, "unimodal")))
  text = f"configs/{module}.py" + (f":{v}" if v else "")
  if recipe == "paper" and dataset.path is None:
    text += " with config.data of configs/synthetic.py" + (f":{v}" if v else "")
  elif dataset.path is not None:
    text += (" with data.name=paired_features," if recipe == "paper" else " with")
    text += f" data.path={dataset.path}"
  if quick:
    text += f"; num_epochs={QUICK_EPOCHS}"
  if seed is None:
    return None, text
  config = load_config(module, v)
  if recipe == "paper" and dataset.path is None:
    config.data = load_config("synthetic", v).data
  elif dataset.path is not None:
    config.data.name, config.data.path = "paired_features", dataset.path
  config.seed = seed
  if quick:
    config.num_epochs = QUICK_EPOCHS
  return config, text


def baseline_arrays(dataset: Dataset, data_config) -> dict[str, Any]:
  """Standardised train rows (minus the config's validation rows) and test split."""
  from dsf3n_jax import input_pipeline as ip
  from dsf3n_jax.datasets import generate_synthetic, validation

  d = data_config
  raw = (generate_synthetic(**dict(d.synthetic)) if dataset.path is None
         else validation.read_paired_file(dataset.path))  # the validated reader
  arrays = validation.validate_arrays(raw, source=dataset.path or "synthetic")
  split = lambda s: ip.ArraySource(arrays[f"visual_{s}"], arrays[f"audio_{s}"],
                                   arrays[f"lab_{s}"])
  rows, _ = ip.stratified_split(arrays["lab_train"], fraction=d.validation_fraction,
                                seed=d.validation_seed)  # as input_pipeline.load_sources
  sources = ip.standardize(ip.Sources(
      train=ip.SubsetSource(split("train"), rows), test=split("test"), validation=None,
      name=dataset.name, num_classes=validation.infer_num_classes(arrays),
      visual_dim=arrays["visual_train"].shape[1], audio_dim=arrays["audio_train"].shape[1]))
  return {"train": ip.load_split_arrays(sources.train),
          "test": ip.load_split_arrays(sources.test),
          "num_classes": sources.num_classes, "visual_dim": sources.visual_dim,
          "audio_dim": sources.audio_dim}


def score(emb_visual, emb_audio, labels) -> dict[str, float]:
  """Test mAP both ways and their average (cosine distance, all items)."""
  from dsf3n_jax import metrics
  maps = metrics.cross_modal_map(np.asarray(emb_visual), np.asarray(emb_audio), labels)
  return {k: float(maps[k]) for k in DIRECTIONS}


def run_cca(ctx: Context) -> list[dict[str, Any]]:
  """Linear CCA on standardised features; embeddings are the canonical variates."""
  t0 = time.perf_counter()
  v, au, details = baselines.fit_linear_cca(ctx.arrays["train"], ctx.arrays["test"],
                                             num_classes=ctx.arrays["num_classes"])
  k = details["components"]
  return [{"name": f"linear CCA ({k} components)", "protocol": "unimodal",
           "train_s": time.perf_counter() - t0, **score(v, au, ctx.arrays["test"]["label"]),
           "details": {"train_correlations": details["train_correlations"]},
           "config": f"closed-form CCA (numpy, float64), {k} components = min(classes, dims, "
                     f"train pairs), ridge {baselines.CCA_RIDGE} x mean variance, "
                     "standardised features"}]


def run_semantic(ctx: Context, kind: str) -> list[dict[str, Any]]:
  """Semantic matching with a logistic regression ("linear") or an MLP ("mlp") per modality."""
  t0 = time.perf_counter()
  v, a, details = baselines.fit_semantic(ctx.arrays["train"], ctx.arrays["test"], kind=kind,
                                         seed=ctx.seed, quick=ctx.quick)
  kwargs = baselines.semantic_kwargs(kind, seed=ctx.seed, quick=ctx.quick)
  name = "LogisticRegression" if kind == "linear" else "MLPClassifier"
  text = ", ".join(f"{k}={v}" for k, v in kwargs.items())
  return [{"protocol": "unimodal", **score(v, a, ctx.arrays["test"]["label"]),
           "train_s": time.perf_counter() - t0, "details": details,
           "config": f"sklearn {name}({text}) per modality on standardised features"}]


def _protocol_row(metrics: dict[str, Any] | None, protocol: str) -> dict[str, Any]:
  """The three numbers of one protocol from train.evaluate's metrics (None when absent)."""
  prefix = PROTOCOL_KEYS[protocol]
  values = {k: (metrics or {}).get(prefix + k) for k in DIRECTIONS}
  row: dict[str, Any] = {"protocol": protocol, **values}
  if any(v is None for v in values.values()):
    row["note"] = f"train.evaluate reported no {prefix}* keys: not measured"
  return row


def _best(results: dict[str, Any]) -> dict[str, Any] | None:
  """The selected checkpoint: epoch, split, metric and value, its metrics per protocol."""
  best = results.get("best")
  if not best:
    return None
  return {"epoch": best.get("epoch"), "selected_on": best.get("selected_on"),
          "metric": best.get("metric", "map_average"),
          "value": best.get("value", best.get("map_average")),
          **{split: {p: _protocol_row(best[split], p) for p in PROTOCOL_KEYS}
             for split in ("validation", "test") if split in best}}


def run_dsf3n(ctx: Context, recipe: str) -> list[dict[str, Any]]:
  """Trains DSF3N with ``recipe`` into a temporary workdir; last epoch's test metrics."""
  from dsf3n_jax import train
  config, _ = dsf3n_config(ctx.dataset, recipe, quick=ctx.quick, seed=ctx.seed)
  with tempfile.TemporaryDirectory(prefix="dsf3n_accuracy_") as workdir:
    t0 = time.perf_counter()
    results = train.train_and_evaluate(config, workdir)
    wall_s = time.perf_counter() - t0
  details = {"epochs": results.get("epochs"), "selected_on": results.get("selected_on"),
             "best": _best(results), "wall_s": wall_s, "num_params": results.get("num_params"),
             "test_examples": results["final"]["test"].get("num_examples"),
             "validation_fraction": config.data.validation_fraction,
             "config_values": json.loads(config.to_json_best_effort())}
  return [{**_protocol_row(results["final"]["test"], p), "train_s": results.get("train_time_s"),
           "details": details} for p in PROTOCOL_KEYS]


class Method(NamedTuple):
  name: str
  group: str  # "baselines" (unimodal protocol) or "dsf3n" (both protocols)
  run: Callable[[Context], list[dict[str, Any]]]

  @property
  def protocols(self) -> tuple[str, ...]:
    return tuple(PROTOCOL_KEYS) if self.group == "dsf3n" else ("unimodal",)


METHODS = {
    "cca": Method("linear CCA", "baselines", run_cca),
    "semantic_linear": Method("semantic matching, logistic regression", "baselines",
                              lambda ctx: run_semantic(ctx, "linear")),
    "semantic_mlp": Method("semantic matching, MLP (1 hidden layer of 256)", "baselines",
                           lambda ctx: run_semantic(ctx, "mlp")),
    "dsf3n_paper": Method("DSF3N, paper recipe", "dsf3n", lambda c: run_dsf3n(c, "paper")),
    "dsf3n_unimodal": Method("DSF3N, unimodal recipe", "dsf3n",
                             lambda c: run_dsf3n(c, "unimodal")),
}


def run_method(key: str, ctx: Context) -> list[dict[str, Any]]:
  """One method's rows; a failure becomes rows carrying its error."""
  m = METHODS[key]
  base = {"method": key, "name": m.name, "config": None, "error": None}
  if m.group == "dsf3n":
    base["config"] = dsf3n_config(ctx.dataset, key.split("_")[1], quick=ctx.quick,
                                  seed=None)[1]
  try:
    return [{**base, **row} for row in m.run(ctx)]
  except Exception as e:  # a failed row is reported, the others still run
    error = f"{type(e).__name__}: {e}"
    return [{**base, "protocol": p, **dict.fromkeys(DIRECTIONS), "train_s": None,
             "error": error, "traceback": traceback.format_exc()[-3000:]}
            for p in m.protocols]


def run_dataset(dataset: Dataset, *, quick: bool, seed: int, only: Sequence[str] = (),
                command: str = "", log=print) -> dict[str, Any]:
  """Every selected row on one dataset; returns the JSON document."""
  started, t0 = sysinfo.machine_info()["date"], time.perf_counter()
  data_config = dsf3n_config(dataset, "paper", quick=quick, seed=seed)[0].data
  arrays = baseline_arrays(dataset, data_config)
  ctx = Context(dataset, quick, seed, arrays)
  rng, labels = np.random.default_rng(seed), arrays["test"]["label"]
  chance = score(*(rng.standard_normal((len(labels), 16)) for _ in range(2)), labels)
  rows = []
  for key in [k for k in METHODS if not only or k in only or METHODS[k].group in only]:
    log(f"[{dataset.name}] {key} ...")
    rows += run_method(key, ctx)
    for r in rows[-len(METHODS[key].protocols):]:
      log(f"  {r['protocol']}: " + (f"FAILED: {r['error'].splitlines()[0]}" if r["error"]
                                    else " ".join(f"{k}={_f(r.get(k))}" for k in DIRECTIONS)))
  return {
      "benchmark": "accuracy", "data": dataset.name, "data_path": dataset.path,
      "quick": quick, "seed": seed, "report_split": "test", "metric": "mAP, cosine, all items",
      "data_config": json.loads(data_config.to_json_best_effort()),
      "num_classes": arrays["num_classes"], "train_examples": len(arrays["train"]["label"]),
      "test_examples": len(arrays["test"]["label"]),
      "chance_map": chance["average"],  # random 16-d embeddings
      "command": command,
      "started": started, "wall_s": time.perf_counter() - t0,
      "machine": sysinfo.machine_info(), "accelerator": sysinfo.accelerator_info(),
      "versions": sysinfo.versions(), "threads": sysinfo.thread_settings(), "rows": rows}


def _f(x, digits: int = 4) -> str:
  return "-" if x is None else f"{x:.{digits}f}"


def _selection_text(doc: dict[str, Any]) -> str:
  parts = [f"{r['name']}: best checkpoint by {d['best']['metric']} on {d['selected_on']} "
           f"(validation_fraction {d['validation_fraction']}), epoch {d['best']['epoch']}"
           for r in doc["rows"] if r["protocol"] == "paired" and not r["error"]
           and (d := r["details"]).get("best")]
  return ("baselines: none (fixed hyperparameters, fit on train); DSF3N: the table shows the "
          f"last epoch; {'; '.join(parts) or 'no DSF3N row ran'} (JSON `best`)")


def markdown(doc: dict[str, Any]) -> str:
  """One dataset's report: header, then the table of rows."""
  m, acc = doc["machine"], doc["accelerator"]
  lines = [f"## Accuracy: {doc['data']}{' (quick mode)' if doc['quick'] else ''}", "",
           f"- Data: {doc['data_path'] or 'built-in synthetic (configs/synthetic.py)'}; "
           f"baselines fit on {doc['train_examples']} train pairs (no validation rows), "
           f"{doc['test_examples']} test pairs, {doc['num_classes']} classes",
           f"- Reported: **test** split, {doc['metric']}; chance (random embeddings) "
           f"{_f(doc['chance_map'], 3)}",
           f"- Selection: {_selection_text(doc)}",
           f"- Seed {doc['seed']}; date {doc['started']}; total {doc['wall_s']:.0f} s",
           f"- Machine: {m['cpu_model']}, {m['cores']} cores ({m['usable_cores']} usable); "
           f"JAX backend {acc['jax_backend']} ({acc['jax_devices']} x "
           f"{acc['jax_device_kind']}); load average at start {m['load_average']}",
           f"- Command: `{doc['command']}`", "",
           "| method | protocol | A->V | V->A | average |", "|---|---|---|---|---|"]
  notes = []
  for r in doc["rows"]:
    cells = ([_f(r[k]) for k in DIRECTIONS] if not r["error"] else ["failed", "", ""])
    lines.append(f"| {r['name']} | {r['protocol']} | " + " | ".join(cells) + " |")
    if r["error"] and r["protocol"] == METHODS[r["method"]].protocols[0]:
      notes.append(f"{r['name']} failed: {r['error'].splitlines()[0][:300]}")
    elif r.get("note"):
      notes.append(f"{r['name']} ({r['protocol']}): {r['note']}")
  configs = {r["name"]: r.get("config") for r in doc["rows"]}
  lines += ["", *(f"- {n}" for n in notes), *(f"- {k}: {v}" for k, v in configs.items()), ""]
  return "\n".join(lines)


def write_files(out_dir: pathlib.Path, stem: str, doc: dict[str, Any],
                text: str) -> list[pathlib.Path]:
  """``<stem>.json`` (``doc``) and ``<stem>.md`` (``text``), each replaced atomically."""
  from dsf3n_jax.paths import atomic_write  # unique temporary names: writers never collide
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
  for path, content in zip(paths, (json.dumps(doc, indent=1, default=str), text)):
    atomic_write(path, content)
  return paths


def publish(out: str | None, stem: str, doc: dict[str, Any], text: str) -> None:
  """A command's report: ``write_files`` into ``out`` (None: benchmarks/results/), the paths
  written on stderr, the Markdown on stdout."""
  for path in write_files(pathlib.Path(out) if out else RESULTS, stem, doc, text):
    print(f"wrote {path}", file=sys.stderr)
  print(text)


def write(doc: dict[str, Any], out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Writes ``accuracy-<data>[-quick].json`` and ``.md`` atomically."""
  stem = f"accuracy-{doc['data']}" + ("-quick" if doc["quick"] else "")
  return write_files(out_dir, stem, doc, markdown(doc))


def main(argv: Sequence[str] | None = None) -> int:
  """Command line; see the module docstring."""
  parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", action="append", default=[],
                      help="synthetic, fsdd or a paired-feature .npz/.h5 file (repeatable)")
  parser.add_argument("--out", default=None, help=f"output folder (default {RESULTS})")
  parser.add_argument("--quick", action="store_true",
                      help=f"DSF3N configs get ':runlocal,tiny' and {QUICK_EPOCHS} epoch")
  parser.add_argument("--seed", type=int, default=0, help="training seed of every row")
  parser.add_argument("--only", action="append", default=[],
                      choices=("baselines", "dsf3n", *METHODS),
                      help="run only these rows or groups (repeatable)")
  raw = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(raw)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  out_dir = pathlib.Path(args.out) if args.out else RESULTS
  log = lambda *a: print(*a, file=sys.stderr, flush=True)
  for dataset in resolve_datasets(args.data):
    doc = run_dataset(dataset, quick=args.quick, seed=args.seed, only=args.only, log=log,
                      command=" ".join(["python -m benchmarks.accuracy", *raw]))
    paths = write(doc, out_dir)
    print(markdown(doc))
    failed = sorted({r["name"] for r in doc["rows"] if r["error"]})
    log("wrote " + " and ".join(map(str, paths)) + (f"; FAILED rows: {failed}" if failed else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
