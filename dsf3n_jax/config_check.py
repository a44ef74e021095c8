"""Config validation: every problem of a resolved run config, found before anything compiles.

``validate(config, num_devices=...)`` checks types, ranges and enumerations of
every field ``train.train_and_evaluate`` reads and raises one ``ConfigError``
listing each problem on its own line, as ``config.<path>=<value>: expected
<what is accepted>``. ``check_unknown_fields(config, reference)`` reports the
fields a config has that ``configs/default.py`` does not, each with the
closest known field. A field an (older) config lacks is not checked: the
code's default for it applies.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, get_args

import ml_collections

from dsf3n_jax import losses, metrics
from dsf3n_jax.datasets import synthetic as synthetic_lib
from dsf3n_jax.input_pipeline import DATASETS
from dsf3n_jax.models import registry
from dsf3n_jax.models.dsf3n import MISSING_PARTNERS
from dsf3n_jax.models.fusion import Variant

# The averages a run may select its best checkpoint on: the paper's protocol (each item
# embedded with its partner) or the deployable one (each modality alone).
SELECTION_METRICS = ("map_average", "unimodal_map_average")
SELECTION_SPLITS = ("validation", "test")  # validation falls back to test when none is carved
ID_FORMS = ("ce", "paper")  # losses.identity_loss
DTYPES = ("float32", "bfloat16", "float64")
SCHEDULES = ("constant", "warmup_step", "cosine")  # train.learning_rate_schedule
_MISSING = object()
# Mappings whose keys are open (a user registers more loss terms), below the reference's own.
OPEN_MAPPINGS = ("loss.terms", "loss.unimodal_terms", "evals")
# Fields that were renamed: an old config's field names its new place.
RENAMED = {"loss.alpha": "loss.terms.pair", "loss.beta": "loss.terms.center",
           "loss.id_weight": "loss.terms.id", "loss.unimodal_alpha": "loss.unimodal_terms.pair",
           "loss.unimodal_beta": "loss.unimodal_terms.center"}

Rule = tuple[Callable[[Any], bool], str]


class ConfigError(ValueError):
  """One or more config problems; ``problems`` holds one line per problem."""

  exit_status = 2  # a usage error on the command line (dsf3n_jax.cli)

  def __init__(self, problems: Iterable[str]):
    self.problems = list(problems)
    super().__init__("\n".join(self.problems))


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int(lo: int | None = None) -> Rule:
  return (lambda v: _is_int(v) and (lo is None or v >= lo),
          "an int" if lo is None else f"an int >= {lo}")


def _num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         hi_open: bool = False) -> Rule:
  """A finite number in the interval given (open or closed at either end)."""
  def ok(v):
    return (_is_real(v) and (lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))
  if lo is not None and hi is not None:
    what = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  elif lo is not None:
    what = f"a number {'>' if lo_open else '>='} {lo}"
  else:
    what = "a finite number"
  return ok, what


def _choice(options: Iterable[str]) -> Rule:
  options = tuple(options)
  return (lambda v: isinstance(v, str) and v in options), "one of " + ", ".join(options)


def _ints(*, odd: bool = False) -> Rule:
  def ok(v):
    return (isinstance(v, (tuple, list)) and len(v) > 0
            and all(_is_int(k) and k > 0 and (k % 2 == 1 or not odd) for k in v))
  return ok, f"a non-empty sequence of {'odd ' if odd else ''}positive ints"


_BOOL: Rule = (lambda v: isinstance(v, bool)), "True or False"
_STR: Rule = (lambda v: isinstance(v, str)), "a string"
_PROBABILITY: Rule = _num(0, 1)
_SELECTION: Rule = ((lambda v: isinstance(v, str) and (v in SELECTION_METRICS or (
    "/" in v and all(v.split("/", 1))))),
                    f"one of {', '.join(SELECTION_METRICS)}, or '<eval name>/<metric>'")
_STEP_RANGE: Rule = ((lambda v: isinstance(v, (tuple, list)) and (len(v) == 0 or (
    len(v) == 2 and all(_is_int(s) for s in v) and 0 <= v[0] < v[1]))),
                     "() or (start, stop) with 0 <= start < stop")
_RATE: Rule = _num(0, 1, hi_open=True)

RULES: tuple[tuple[str, Rule], ...] = (
    ("seed", _int()),
    # One of DATASETS or any registered TFDS dataset (checked when the data loads).
    ("data.name", ((lambda v: isinstance(v, str) and bool(v.strip())),
                   f"a dataset name: {', '.join(DATASETS)} or a registered TFDS dataset")),
    ("data.path", _STR),
    ("data.data_dir", _STR),
    ("data.num_classes", _int(0)),
    ("data.validation_fraction", _RATE),
    ("data.validation_seed", _int()),
    ("data.shuffle", _BOOL),
    ("data.on_device", ((lambda v: str(v).lower() in ("auto", "true", "false")),
                        "one of auto, true, false")),
    ("data.normalize", _choice(("none", "standardize"))),
    ("model.name", _STR),
    *((f"model.{part}", _STR) for part in registry.PARTS),
    ("model.visual_dim", _int(0)),
    ("model.audio_dim", _int(0)),
    *((f"model.{k}", _int(1)) for k in (
        "encoder_features", "stem_features", "stem_kernel", "stem_stride", "head_hidden",
        "embed_dim", "classifier_hidden")),
    ("model.stem_padding", _int(0)),
    ("model.kernel_sizes", _ints(odd=True)),
    ("model.branch_features", _ints()),
    ("model.num_fusion_stages", _int(0)),
    ("model.mfa_variant", _choice(get_args(Variant))),
    ("model.use_mfa", _BOOL),
    ("model.dropout_rate", _RATE),
    ("model.missing_partner", _choice(MISSING_PARTNERS)),
    ("model.partner_dropout", _PROBABILITY),
    ("model.dtype", _choice(DTYPES)),
    ("loss.id_form", _choice(ID_FORMS)),
    ("loss.unimodal_weight", _num(0)),
    ("optim.lr", _num(0)),
    ("optim.b1", _RATE),
    ("optim.b2", _RATE),
    ("optim.eps", _num(0, lo_open=True)),
    ("optim.weight_decay", _num(0)),
    ("optim.grad_clip_norm", _num(0)),
    ("optim.schedule", _choice(SCHEDULES)),
    ("optim.center_lr", _num(0)),
    ("num_epochs", _int(1)),
    ("eval_every_epochs", _int(0)),
    ("checkpoint_every_epochs", _int(0)),
    ("checkpoint_every_steps", _int(0)),
    ("steps_per_call", _int(0)),
    ("profile_steps", _STEP_RANGE),
    ("keep_checkpoints", _int(1)),
    ("checkpoint_optimizer_state", _BOOL),
    ("allow_resume_mismatch", _BOOL),
    ("log_every_steps", _int(0)),
    ("selection_split", _choice(SELECTION_SPLITS)),
    ("selection_metric", _SELECTION),
    ("early_stopping_patience", _int(0)),
    ("metric.distance", _choice(get_args(metrics.Distance))),
    ("metric.k", _int(0)),
    ("metric.original_test_batches", _int(0)),
    ("distributed.coordinator_address", _STR),
    ("distributed.num_processes", _int(0)),
    ("distributed.process_id", _int(-1)),
    ("distributed.initialization_timeout", _int(1)),
    ("distributed.heartbeat_timeout", _int(1)),
)


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
    try:
      good = ok(value)
    except (TypeError, ValueError):
      good = False
    if not good:
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
    if not (_is_int(value) and value >= 1 and value % num_devices == 0):
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
  positions = (length + 2 * padding - kernel) // stride + 1
  for _ in range(1 + len(branches)):  # after the stem and after each branch stage
    positions //= 2
  if positions >= 1:
    return []
  return [_problem("model.encoder_features", length,
                   f"a length that leaves at least one position after the stem (kernel "
                   f"{kernel}, stride {stride}, padding {padding}) and {1 + len(branches)} "
                   "max-pools by 2")]


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
    except ValueError:
      out.append(_problem(path, value, f"a registered {kind}: "
                          f"{', '.join(registry.names(kind))} ({registry.IMPORT_HINT})"))
  return out


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
      except ValueError:
        out.append(_problem(f"loss.{group}.{name}", weight, "a registered loss term: "
                            f"{', '.join(registry.names('loss_term'))} ({registry.IMPORT_HINT})"))
      if not (_is_real(weight) and weight >= 0):
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
      if key in entry and not (_is_int(entry[key]) and entry[key] >= 0):
        out.append(_problem(f"{where}.{key}", entry[key], "an int >= 0"))
  return out


def _cross_field_problems(config, problems: list[str]) -> list[str]:
  """Checks between fields (or of open-ended fields) whose own values passed."""
  bad = {p.split("=", 1)[0].removeprefix("config.") for p in problems}
  out = _geometry_problems(config, bad) + _registry_problems(config, bad)
  out += _loss_term_problems(config) + _eval_problems(config)
  if lookup(config, "data.name") == "paired_features" and not lookup(config, "data.path", ""):
    out.append(_problem("data.path", lookup(config, "data.path", ""),
                        "the paired-feature file (.npz/.h5) for data.name='paired_features'"))
  synthetic = lookup(config, "data.synthetic", {})
  known = [f"data.synthetic.{k}"
           for k in inspect.signature(synthetic_lib.generate_synthetic).parameters]
  for key in (synthetic.keys() if _is_node(synthetic) else ()):
    if f"data.synthetic.{key}" not in known:
      out.append(unknown_field_message(f"data.synthetic.{key}", known))
  return out


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
