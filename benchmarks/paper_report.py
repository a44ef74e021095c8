"""The paper's tables: their rows (the ablation grid), progress lines and the reports.

``benchmarks.paper`` runs the rows; this module holds what the tables are (the
seven ablations of J_dis, J_intra and MFA, both protocols), the progress line
with its ETA, the paper's ordering checked on the results, and the Markdown.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from benchmarks import accuracy

PROTOCOLS = ("paired", "unimodal")


class Ablation(NamedTuple):
  key: str
  name: str
  dis: bool  # J_dis: the identity (classification) loss
  intra: bool  # J_intra: the centre loss
  mfa: bool


ABLATIONS = (
    Ablation("full", "J_dis + J_intra + MFA (full model)", True, True, True),
    Ablation("no_mfa", "J_dis + J_intra, no MFA", True, True, False),
    Ablation("no_intra", "J_dis + MFA, no J_intra", True, False, True),
    Ablation("no_dis", "J_intra + MFA, no J_dis", False, True, True),
    Ablation("dis_only", "J_dis only, no MFA", True, False, False),
    Ablation("intra_only", "J_intra only, no MFA", False, True, False),
    Ablation("mfa_only", "MFA, neither loss (pair term only)", False, False, True),
)


class Progress:
  """One line per event: a bar over the rows' work, the row and seed, and an ETA.

  A DSF3N row weighs its epochs (twice for the ``:unimodal`` recipe: its step also embeds
  each modality alone; times its configurations and the refit for a swept row); the ETA
  runs each kind of row (baselines, DSF3N) at its own measured rate.
  """

  def __init__(self, rows: list, log: Callable[[str], None]):
    self.rows = {r.key: r for r in rows}
    self.weight = {k: (r.config.num_epochs * (2 if r.config.loss.unimodal_weight else 1)
                       * (len(r.sweep) + 1 if getattr(r, "sweep", None) else 1)
                       if r.kind == "dsf3n" else 1.0) for k, r in self.rows.items()}
    self.left = {kind: sum(self.weight[k] for k, r in self.rows.items() if r.kind == kind)
                 for kind in ("baseline", "dsf3n")}
    self.total = sum(self.left.values())
    self.spent = {"baseline": 0.0, "dsf3n": 0.0}
    self.done = {"baseline": 0.0, "dsf3n": 0.0}
    self.log, self.current = log, None

  def start(self, key: str) -> None:
    self.current, self.row_t0 = key, time.perf_counter()

  def finish(self, key: str, *, skipped: bool = False) -> None:
    kind = self.rows[key].kind
    self.left[kind] -= self.weight[key]
    if skipped:
      self.total -= self.weight[key]
    else:
      self.spent[kind] += time.perf_counter() - self.row_t0
      self.done[kind] += self.weight[key]
    self.current = None

  def __call__(self, message: str, done_fraction: float = 0.0) -> None:
    kind = self.rows[self.current].kind if self.current else "dsf3n"
    partial = done_fraction * self.weight.get(self.current, 0.0)
    spent, done = dict(self.spent), dict(self.done)
    if self.current:
      spent[kind] += time.perf_counter() - self.row_t0
      done[kind] += partial
    rates = {k: spent[k] / done[k] for k in done if done[k] > 0}
    left = {k: v - (partial if k == kind else 0.0) for k, v in self.left.items()}
    eta = (sum(left[k] * rates[k] for k in left if left[k] > 0)
           if all(k in rates for k in left if left[k] > 0) else None)
    frac = sum(done.values()) / max(self.total, 1e-9)
    bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
    self.log(f"[{bar}] {100 * frac:3.0f}% {message}"
             + (f"; ETA {eta / 60:.1f} min" if eta is not None else ""))


COMPONENTS = ("dis", "intra", "mfa")
COMPONENT_NAMES = {"dis": "J_dis", "intra": "J_intra", "mfa": "MFA"}


def ordering(doc: dict[str, Any]) -> dict[str, Any]:
  """The paper's claims checked per protocol on the mean test mAP of the ablation rows.

  ``full_is_best``: the full model has the highest mean. ``helps[c]``: over the pairs of
  rows that differ only in component ``c``, how many gain from adding it (``[gains, pairs]``).
  """
  means = {}
  for r in doc["rows"]:
    a = next((a for a in ABLATIONS if a.key == r["key"]), None)
    if a is not None and not r.get("error"):
      means[(a.dis, a.intra, a.mfa)] = {p: r["protocols"][p]["mean"]["average"]
                                        for p in PROTOCOLS}
  out: dict[str, Any] = {}
  for p in PROTOCOLS:
    if not means:
      break
    best = max(means, key=lambda k: means[k][p])
    helps = {}
    for i, c in enumerate(COMPONENTS):
      pairs = [(k, k[:i] + (True,) + k[i + 1:]) for k in means if not k[i]]
      pairs = [(off, on) for off, on in pairs if on in means]
      helps[c] = [sum(means[on][p] > means[off][p] for off, on in pairs), len(pairs)]
    out[p] = {"full_is_best": best == (True, True, True) if (True, True, True) in means
              else None,
              "best": next(a.key for a in ABLATIONS if (a.dis, a.intra, a.mfa) == best),
              "helps": helps}
  return out



def _pm(mean, std) -> str:
  return "-" if mean is None else f"{mean:.3f} ± {std:.3f}"


def cell(entry, protocol: str, key: str = "average") -> str:
  if entry.get("error"):
    return "failed"
  p = entry.get("protocols", {}).get(protocol)
  return "n/a" if p is None else _pm(p["mean"][key], p["std"][key])


def _seed_counts(doc: dict[str, Any]) -> str:
  """The seeds each row's mean is over: this run's, and the counts of rows kept from runs
  with other seeds (a row records how many of its seeds finished, ``seeds_used``)."""
  counts: dict[int, list[str]] = {}
  for row in doc["rows"]:
    used = {p["seeds_used"] for p in (row.get("protocols") or {}).values()}
    if used:
      counts.setdefault(max(used), []).append(row["key"])
  text = f"seeds {doc['seeds']}"
  if len(counts) > 1 or (counts and next(iter(counts)) != len(doc["seeds"])):
    text = "each row's seeds: " + "; ".join(
        f"{n} seeds ({len(keys)} row{'s' if len(keys) > 1 else ''}"
        + (f": {', '.join(keys)}" if len(keys) <= 3 else "") + ")"
        for n, keys in sorted(counts.items(), reverse=True)) + f"; this run's seeds {doc['seeds']}"
  return text


def markdown(doc: dict[str, Any]) -> str:
  m = doc["machine"]
  seeds = doc["seeds"]
  published = doc.get("published") or {}
  pub = (lambda key: f" | {published[key]:.3f}" if key in published else " | -") if published \
      else (lambda key: "")
  pub_head = " | paper" if published else ""
  lines = [f"# The paper's tables: {doc['data']}{' (quick mode)' if doc['quick'] else ''}", "",
           f"- Data: {doc['data_source']}; {doc['train_examples']} train pairs (validation carved "
           f"out), {doc['test_examples']} test pairs, {doc['num_classes']} classes",
           f"- Every cell: **test** split, {doc['metric']}, average of A->V and V->A, mean ± "
           f"std (population, ddof=0) over {_seed_counts(doc)}; selection: {doc['selection']}",
           f"- Machine: {m['cpu_model']}, {m['cores']} cores; date {doc['started']}"
           + (f" (rows kept from a run of {doc['first_started']})" if doc.get("first_started")
              else "") + "; the rows "
           f"took {doc.get('rows_s', 0) / 60:.1f} min in all (this run: "
           f"{doc.get('wall_s', 0) / 60:.1f} min, rows kept from earlier runs not counted)",
           f"- Command: `{doc['command']}`",
           "- The paper's published numbers: " + ("beside ours" if published else
                                                 "not held by this project for this data")]
  by_key = {r["key"]: r for r in doc["rows"]}
  comparison = [r for r in doc["rows"] if r["table"] == "comparison"]
  if "full" in by_key:
    comparison.insert(len([r for r in comparison if r["kind"] == "baseline"]),
                      {**by_key["full"], "name": "DSF3N, the data's config (full model)"})
  if comparison:  # a table without rows (a run --only of the other) is left out
    lines += ["", "## Table I/II: comparison methods", "",
              f"| method | unimodal | paired{pub_head} |",
              "|---|---|---|" + ("---|" if published else "")]
  for r in comparison:
    paired = cell(r, "paired") if r["kind"] == "dsf3n" else "(unimodal only)"
    lines.append(f"| {r['name']} | {cell(r, 'unimodal')} | {paired}{pub(r['key'])} |")
  swept = by_key.get("swept_recipe")
  if swept and swept.get("chosen"):
    from dsf3n_jax.sweep import margin_text
    chosen = ", ".join(f"{k}={v}" for k, v in swept["chosen"]["overrides"].items())
    lines += ["", f"The swept row: {len(swept.get('sweep', []))} configurations of "
              f"`python -m dsf3n_jax.sweep` (the JSON's `sweep`) on top of "
              f"`configs/paired_features.py:unimodal` (the data's own data section); each "
              f"seed's best state on validation (epochs {swept['chosen']['epochs']}), the "
              f"configuration chosen by {swept['chosen']['selected_on']}: {chosen}"
              + (f", {margin_text(swept['chosen']['margin'])}."
                 if "margin" in swept["chosen"] else ".")
              + (" Then each seed trained that configuration again on train + validation "
                 "(the split that chose it goes back into training); the row is the final "
                 "states' test"
                 + ("" if swept["chosen"].get("refit_seeds", len(seeds)) == len(seeds) else
                    f" ({swept['chosen']['refit_seeds']} of {len(seeds)} seeds; the others "
                    "fit their validation pairs worse than their selected state scored on them "
                    "held out, and keep that state)")
                 + ". The selected states' own test, unimodal "
                 f"{cell({'protocols': swept['selection_test']}, 'unimodal')}, paired "
                 f"{cell({'protocols': swept['selection_test']}, 'paired')}."
                 if swept.get("selection_test") else "")]
  if any(a.key in by_key for a in ABLATIONS):
    lines += ["", "## Table III/IV: ablations (the pair term in every row)", "",
              f"| J_dis | J_intra | MFA | paired | unimodal{pub_head} |",
              "|---|---|---|---|---|" + ("---|" if published else "")]
  for a in ABLATIONS:
    r = by_key.get(a.key)
    if r is None:
      continue
    mark = lambda on: "yes" if on else "-"
    lines.append(f"| {mark(a.dis)} | {mark(a.intra)} | {mark(a.mfa)} | {cell(r, 'paired')} | "
                 f"{cell(r, 'unimodal')}{pub(a.key)} |")
  failed = [f"- {r['key']} failed: {r['error'].splitlines()[0][:300]}"
            for r in doc["rows"] if r.get("error")]
  lines += ["", *failed]
  checks = ordering(doc)
  if checks:
    lines += ["The paper's ordering, on these means:", ""]
    for p, c in checks.items():
      helps = ", ".join(f"{COMPONENT_NAMES[k]} {g} of {n}" for k, (g, n) in c["helps"].items())
      verdict = {True: "the full model is best", False: f"the full model is NOT best "
                 f"(best: {c['best']})", None: "the full model was not run"}[c["full_is_best"]]
      lines.append(f"- {p}: {verdict}; adding a component raises the mean in (pairs of rows "
                   f"that differ only in it): {helps}")
    lines.append("")
  fig = doc.get("figure_3")
  if fig:
    lines += ["## Fig. 3", "", f"Test split, the full model's seed {fig['seed']} (best "
              f"{fig['selected_on']}):", "",
              *(f"![{k}]({v})" for k, v in fig["files"].items()), ""]
  return "\n".join(lines)


def write(doc: dict[str, Any], out_dir: pathlib.Path, stem: str) -> list[pathlib.Path]:
  """``<stem>.json`` and ``<stem>.md``, each replaced atomically."""
  return accuracy.write_files(out_dir, stem, doc, markdown(doc))
