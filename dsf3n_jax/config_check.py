"""Config validation: every problem of a resolved run config, found before anything compiles.

``validate(config, num_devices=...)`` checks types, ranges and enumerations of
every field ``train.train_and_evaluate`` reads (each field's rule is declared
with it, in ``config_schema``) and raises one ``ConfigError``
listing each problem on its own line, as ``config.<path>=<value>: expected
<what is accepted>``. ``check_unknown_fields(config, reference)`` reports the
fields a config has that ``configs/default.py`` does not, each with the
closest known field. A field an (older) config lacks is not checked: the
code's default for it applies.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from dsf3n_jax import config_schema, losses
from dsf3n_jax.config_schema import Rule, is_int, is_real
from dsf3n_jax.datasets import synthetic as synthetic_lib
from dsf3n_jax.models import registry
from dsf3n_jax.models.fine_grained import positions_left

# Mappings whose keys are open (a user registers more loss terms), below the reference's own.
OPEN_MAPPINGS = ("loss.terms", "loss.unimodal_terms", "evals",
                 *(f"model.{kind}_kw" for kind in registry.PARTS))
# Fields that were renamed: an old config's field names its new place.
RENAMED = {"loss.alpha": "loss.terms.pair", "loss.beta": "loss.terms.center",
           "loss.id_weight": "loss.terms.id", "loss.unimodal_alpha": "loss.unimodal_terms.pair",
           "loss.unimodal_beta": "loss.unimodal_terms.center"}
_MISSING = object()


class ConfigError(ValueError):
  """One or more config problems; ``problems`` holds one line per problem."""

  exit_status = 2  # a usage error on the command line (dsf3n_jax.cli)

  def __init__(self, problems: Iterable[str]):
    self.problems = list(problems)
    super().__init__("\n".join(self.problems))


# Each field's own rule, declared with it (dsf3n_jax.config_schema).
RULES: tuple[tuple[str, Rule], ...] = config_schema.rules()


def _is_node(value) -> bool:
  return isinstance(value, (Mapping, ml_collections.ConfigDict))


def lookup(config: Mapping[str, Any], path: str, default: Any = _MISSING) -> Any:
  """``config.a.b`` for ``path`` 'a.b'; ``default`` (a sentinel: unchecked) if absent."""
  node = config
  for key in path.split("."):
    if not _is_node(node) or key not in node:
      return default
    node = node[key]
  return node


def _problem(path: str, value: Any, expected: str) -> str:
  return f"config.{path}={value!r}: expected {expected}"


def _rule_problems(config) -> list[str]:
  problems = []
  for path, (ok, expected) in RULES:
    value = lookup(config, path)
    if value is _MISSING:
      continue
    if not _accepts((ok, expected), value):
      problems.append(_problem(path, value, expected))
  return problems


def _batch_problems(config, num_devices: int) -> list[str]:
  """Global batch sizes: positive multiples of the device count (so >= it)."""
  problems = []
  what = (f"a positive multiple of the {num_devices} devices" if num_devices > 1
          else "an int >= 1")
  for path in ("batch_size", "eval_batch_size"):
    value = lookup(config, path)
    if value is _MISSING:
      continue
    if not (is_int(value) and value >= 1 and value % num_devices == 0):
      problems.append(_problem(path, value, what))
  return problems


def _geometry_problems(config, bad: set[str]) -> list[str]:
  """The stem and the max-pools by 2 must leave the branches at least one position."""
  geometry = ("model.encoder_features", "model.stem_kernel", "model.stem_stride",
              "model.stem_padding", "model.branch_features")
  values = [lookup(config, p) for p in geometry]
  if bad.intersection(geometry) or _MISSING in values:
    return []
  length, kernel, stride, padding, branches = values
  if positions_left(length, kernel, stride, padding, len(branches)) >= 1:
    return []
  return [_problem("model.encoder_features", length,
                   f"a length that leaves at least one position after the stem (kernel "
                   f"{kernel}, stride {stride}, padding {padding}) and {1 + len(branches)} "
                   "max-pools by 2")]


def _import_failure(e: ValueError) -> str:
  """Why a "module:name" did not register: its module's import error, when that was it."""
  text = str(e)
  return f"; {text.split(': ', 1)[-1]}" if "cannot import" in text else ""


def _registry_problems(config, bad: set[str]) -> list[str]:
  """Model and part names must be registered (by the time the config is checked)."""
  out = []
  for kind in ("model", *registry.PARTS):
    path = "model.name" if kind == "model" else f"model.{kind}"
    value = lookup(config, path)
    if value is _MISSING or path in bad:
      continue
    try:
      registry.lookup(kind, value)  # "module:name" imports the module that registers it
    except ValueError as e:
      out.append(_problem(path, value, f"a registered {kind}: "
                          f"{', '.join(registry.names(kind))} ({registry.IMPORT_HINT})"
                          + _import_failure(e)))
  return out


def _part_problems(config, bad: set[str]) -> list[str]:
  """``model.<kind>_kw``: the settings of the part chosen, each by its rule (a part's own
  fields: ``config_schema.part_fields``)."""
  out = []
  for kind in registry.PARTS:
    name, kw = lookup(config, f"model.{kind}"), lookup(config, f"model.{kind}_kw", {})
    if name is _MISSING or f"model.{kind}" in bad or not isinstance(name, str):
      continue
    if not _is_node(kw):
      out.append(_problem(f"model.{kind}_kw", kw, f"a mapping of the {kind}'s settings"))
      continue
    try:
      settings = registry.part_settings(kind, name)
    except ValueError:
      continue  # not registered: _registry_problems says so
    out += registry.settings_problems(kind, name, settings, kw)
    for field in config_schema.part_fields(kind, name):
      key = field.path.rsplit(".", 1)[1]
      if key in kw and field.rule is not None and not _accepts(field.rule, kw[key]):
        out.append(_problem(field.path, kw[key], field.rule[1]))
  return out


def _accepts(rule: Rule, value: Any) -> bool:
  try:
    return bool(rule[0](value))
  except (TypeError, ValueError):
    return False


def _loss_term_problems(config) -> list[str]:
  """``loss.terms`` / ``loss.unimodal_terms``: registered names, weights >= 0, some terms."""
  out = []
  for group in ("terms", "unimodal_terms"):
    terms = lookup(config, f"loss.{group}", {})
    if not _is_node(terms):
      out.append(_problem(f"loss.{group}", terms, "a mapping of loss term names to weights"))
      continue
    for name, weight in terms.items():
      try:
        losses.lookup_term(name)
      except ValueError as e:
        out.append(_problem(f"loss.{group}.{name}", weight, "a registered loss term: "
                            f"{', '.join(registry.names('loss_term'))} ({registry.IMPORT_HINT})"
                            + _import_failure(e)))
      if not (is_real(weight) and weight >= 0):
        out.append(_problem(f"loss.{group}.{name}", weight, "a weight >= 0"))
    if group == "terms" and not terms:
      out.append(_problem("loss.terms", {}, "at least one loss term"))
  unknown = set(lookup(config, "loss.unimodal_terms", {}) or {}) - set(
      lookup(config, "loss.terms", {}) or {})
  out += [_problem(f"loss.unimodal_terms.{name}", lookup(config, f"loss.unimodal_terms.{name}"),
                   "a term of loss.terms") for name in sorted(unknown)]
  return out


def _eval_problems(config) -> list[str]:
  """``evals``: each a mapping with a registered ``type``, a split, and schedules >= 0."""
  from dsf3n_jax import evaluators  # pylint: disable=g-import-not-at-top
  evals = lookup(config, "evals", _MISSING)
  if evals is _MISSING:
    return []
  if not _is_node(evals) or not evals:
    return [_problem("evals", evals, "a mapping of evaluator names to their settings (at "
                     "least one)")]
  out = []
  for name, entry in evals.items():
    where = f"evals.{name}"
    if not _is_node(entry):
      out.append(_problem(where, entry, "a mapping with type and split"))
      continue
    kind = entry.get("type", _MISSING)
    try:
      registry.lookup("evaluator", kind)
    except (ValueError, TypeError):
      out.append(_problem(f"{where}.type", None if kind is _MISSING else kind,
                          f"a registered evaluator: {', '.join(registry.names('evaluator'))} "
                          f"({registry.IMPORT_HINT})"))
    split = entry.get("split", name)
    if split not in evaluators.SPLITS:
      out.append(_problem(f"{where}.split", split, "one of " + ", ".join(evaluators.SPLITS)))
    for key in ("every_steps", "every_epochs"):
      if key in entry and not (is_int(entry[key]) and entry[key] >= 0):
        out.append(_problem(f"{where}.{key}", entry[key], "an int >= 0"))
    if entry.get("every_steps") and entry.get("every_epochs") is not None:
      out.append(_problem(f"{where}.every_epochs", entry["every_epochs"],
                          f"unset beside config.{where}.every_steps={entry['every_steps']} (a "
                          "schedule is in steps or in epochs)"))
  return out


def _cross_field_problems(config, problems: list[str]) -> list[str]:
  """Checks between fields (or of open-ended fields) whose own values passed."""
  bad = {p.split("=", 1)[0].removeprefix("config.") for p in problems}
  out = _geometry_problems(config, bad) + _registry_problems(config, bad)
  out += _part_problems(config, bad)
  out += _loss_term_problems(config) + _eval_problems(config)
  patience = lookup(config, "early_stopping_patience", 0)
  if lookup(config, "selection_split", "") == "last" and patience and "early_stopping_patience" \
      not in bad:
    out.append(_problem("early_stopping_patience", patience, "0 with selection_split='last' "
                        "(early stopping compares a selection evaluator's losses; 'last' has "
                        "none)"))
  if lookup(config, "data.name") == "paired_features" and not lookup(config, "data.path", ""):
    out.append(_problem("data.path", lookup(config, "data.path", ""),
                        "the paired-feature file (.npz/.h5) for data.name='paired_features'"))
  synthetic = lookup(config, "data.synthetic", {})
  known = [f"data.synthetic.{k}" for k in synthetic_lib.OPTIONS]
  for key in (synthetic.keys() if _is_node(synthetic) else ()):
    if f"data.synthetic.{key}" not in known:
      out.append(unknown_field_message(f"data.synthetic.{key}", known))
    elif not _accepts(rule := _synthetic_rule(key), synthetic[key]):
      out.append(_problem(f"data.synthetic.{key}", synthetic[key], rule[1]))
  return out


# generate_synthetic's bounds: a float option is a finite number >= 0; an int option an int
# >= 1, except these.
_SYNTHETIC_INT_MIN = {"seed": 0, "nuisance_dim": 0}


def _synthetic_rule(key: str) -> Rule:
  if isinstance(synthetic_lib.OPTIONS[key], float):
    return config_schema.number(0)
  return config_schema.integer(_SYNTHETIC_INT_MIN.get(key, 1))


def validate(config: Mapping[str, Any], *, num_devices: int) -> None:
  """Raises ``ConfigError`` listing every problem of ``config`` (one line each); else None.

  Args:
    config: the resolved run config (``configs/default.py``'s fields).
    num_devices: global device count; both batch sizes must be multiples of it.
  """
  problems = _rule_problems(config) + _batch_problems(config, num_devices)
  problems += _cross_field_problems(config, problems)
  if problems:
    raise ConfigError(problems)


def key_paths(config: Mapping[str, Any], prefix: str = "") -> list[str]:
  """Every dotted key path of a nested mapping, inner nodes included."""
  paths = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    paths.append(path)
    if _is_node(value):
      paths += key_paths(value, f"{path}.")
  return paths


def _initials(name: str) -> str:
  return "".join(word[0] for word in name.split("_") if word)


def closest_field(path: str, known: Iterable[str]) -> str | None:
  """The known path that ``path`` most likely meant, or None.

  In order: the same name under another parent, a sibling that is the initials
  of the name or whose initials the name is (learning_rate / lr), the nearest
  spelling among the siblings, the nearest (close) spelling anywhere.
  """
  known = list(known)
  parent, _, name = path.rpartition(".")
  siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
  prefix = f"{parent}." if parent else ""
  same_name = [k for k in known if k.rpartition(".")[2] == name]
  if same_name:
    return same_name[0]
  for sibling in siblings:  # learning_rate -> lr, wd -> weight_decay
    if ("_" in name and sibling == _initials(name)) or (
        "_" in sibling and name == _initials(sibling)):
      return prefix + sibling
  near = difflib.get_close_matches(name, siblings, n=1)
  if near:
    return prefix + near[0]
  leaves = {k.rpartition(".")[2]: k for k in reversed(known)}  # a misplaced field
  near = difflib.get_close_matches(name, list(leaves), n=1, cutoff=0.8)
  return leaves[near[0]] if near else None


def unknown_field_message(path: str, known: Iterable[str]) -> str:
  """'config.<path>: unknown field; did you mean config.<closest>?' (or the known siblings)."""
  known = list(known)
  if path in RENAMED:
    return f"config.{path}: unknown field; it is now config.{RENAMED[path]}"
  guess = closest_field(path, known)
  if guess:
    return f"config.{path}: unknown field; did you mean config.{guess}?"
  parent = path.rpartition(".")[0]
  siblings = sorted(k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent)
  where = f"config.{parent}" if parent else "config"
  return f"config.{path}: unknown field; the fields of {where} are {', '.join(siblings)}"


def unknown_fields(config: Mapping[str, Any], reference: Mapping[str, Any]) -> list[str]:
  """One message per key path of ``config`` that ``reference`` lacks.

  Below an empty mapping of ``reference`` (``data.synthetic``: generator keyword
  arguments) any key is accepted; only the top unknown path of a subtree is named.
  """
  known = key_paths(reference)
  known_set = set(known)
  skip = [p for p in known if _is_node(lookup(reference, p)) and not lookup(reference, p)]
  skip += OPEN_MAPPINGS
  out = []
  for path in key_paths(config):
    if path in known_set or any(path.startswith(f"{p}.") for p in skip):
      continue
    skip.append(path)
    out.append(unknown_field_message(path, known))
  return out


def check_unknown_fields(config: Mapping[str, Any], reference: Mapping[str, Any]) -> None:
  """Raises ``ConfigError`` naming each field of ``config`` not in ``reference``."""
  problems = unknown_fields(config, reference)
  if problems:
    raise ConfigError(problems)
