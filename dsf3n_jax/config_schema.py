"""The config's fields, each declared once: its default, what it accepts and what it does.

``configs/default.py`` builds the base config from these declarations
(``defaults()``), and ``config_check`` checks a config against the same ones,
so a new field is one ``Field`` here. The model's fields and their defaults
come from ``DSF3N`` itself (its dataclass fields). What cannot be said of one
field alone (batch sizes against the device count, the stem's geometry,
registered names, loss terms, evaluators) is checked by ``config_check``.

``python -m dsf3n_jax.config_schema`` prints every field: path, default, what
it accepts and its help.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, get_args, get_origin, get_type_hints

import ml_collections

Rule = tuple[Callable[[Any], bool], str]  # (accepts(value), what is accepted)

# The averages a run may select its best checkpoint on: the paper's protocol (each item
# embedded with its partner) or the deployable one (each modality alone).
SELECTION_METRICS = ("map_average", "unimodal_map_average")
SELECTION_MODES = ("auto", "max", "min")
SELECTION_SPLITS = ("validation", "test", "last")  # validation falls back to test when none is
# carved; last: no selection, the final state is the best (a refit on train + validation)
ID_FORMS = ("ce", "paper")  # losses.identity_loss
DTYPES = ("float32", "bfloat16", "float64")
SCHEDULES = ("constant", "warmup_step", "cosine")  # train.learning_rate_schedule


def is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None) -> Rule:
  return (lambda v: is_int(v) and (lo is None or v >= lo),
          "an int" if lo is None else f"an int >= {lo}")


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Rule:
  """A finite number in the interval given (open or closed at either end)."""
  def ok(v):
    return (is_real(v) and (lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))
  if lo is not None and hi is not None:
    what = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  elif lo is not None:
    what = f"a number {'>' if lo_open else '>='} {lo}"
  else:
    what = "a finite number"
  return ok, what


def choice(options: Iterable[str]) -> Rule:
  options = tuple(options)
  return (lambda v: isinstance(v, str) and v in options), "one of " + ", ".join(options)


def positive_ints(*, odd: bool = False) -> Rule:
  def ok(v):
    return (isinstance(v, (tuple, list)) and len(v) > 0
            and all(is_int(k) and k > 0 and (k % 2 == 1 or not odd) for k in v))
  return ok, f"a non-empty sequence of {'odd ' if odd else ''}positive ints"


BOOL: Rule = (lambda v: isinstance(v, bool)), "True or False"
STRING: Rule = (lambda v: isinstance(v, str)), "a string"
PROBABILITY: Rule = number(0, 1)
RATE: Rule = number(0, 1, hi_open=True)
SELECTION: Rule = ((lambda v: isinstance(v, str) and (v in SELECTION_METRICS or (
    "/" in v and all(v.split("/", 1))))),
                   f"one of {', '.join(SELECTION_METRICS)}, or '<eval name>/<metric>'")
STEP_RANGE: Rule = ((lambda v: isinstance(v, (tuple, list)) and (len(v) == 0 or (
    len(v) == 2 and all(is_int(s) for s in v) and 0 <= v[0] < v[1]))),
                    "() or (start, stop) with 0 <= start < stop")


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its dotted path, default, rule (None: checked elsewhere) and help."""

  path: str
  default: Any
  rule: Rule | None
  help: str


def _model_fields() -> list[Field]:
  """``config.model``: ``DSF3N``'s fields and defaults, the name, input sizes and dtype."""
  from dsf3n_jax.models import DSF3N, registry  # pylint: disable=g-import-not-at-top
  from dsf3n_jax.models.dsf3n import MISSING_PARTNERS  # pylint: disable=g-import-not-at-top
  defaults = registry.model_fields(DSF3N)
  width = integer(1)
  declared = {
      "encoder_features": (width, "length of the feature sequence the encoder's stem sees"),
      "kernel_sizes": (positive_ints(odd=True), "the fine-grained Conv1d branches' kernels"),
      "stem_features": (width, "channels of the stem convolution"),
      "stem_kernel": (width, "kernel of the stem convolution"),
      "stem_stride": (width, "stride of the stem convolution"),
      "stem_padding": (integer(0), "padding of the stem convolution"),
      "branch_features": (positive_ints(), "channels of each branch stage"),
      "fusion": (STRING, "a registered fusion (models.registry), set up by fusion_kw"),
      "head": (STRING, "a registered head, set up by head_kw"),
      "classifier": (STRING, "a registered classifier, set up by classifier_kw"),
      "embed_dim": (width, "the retrieval embedding's size (the head's features)"),
      "dropout_rate": (RATE, "dropout of every part with a dropout_rate field (the stock head "
                       "and classifiers)"),
      "missing_partner": (choice(MISSING_PARTNERS), "what the fusion sees in place of the absent "
                          "modality when one is embedded alone (the unimodal protocol)"),
      "partner_dropout": (PROBABILITY, "in train mode, the share of examples whose fusion sees "
                          "the stand-in instead of the partner"),
      "input_noise": (number(0), "in train mode, the standard deviation of Gaussian noise "
                      "added to every (standardised) input feature"),
  }
  skip = ("num_classes", "dtype", "param_dtype", "bn_momentum", "bn_epsilon", "visual_dim",
          "audio_dim")
  missing = sorted(k for k in set(defaults) - set(declared) - set(skip) if not k.endswith("_kw"))
  if missing:  # a new DSF3N field must say what it accepts
    raise TypeError(f"config_schema: DSF3N fields without a declaration: {missing}")
  fields = [Field("model.name", "dsf3n", STRING, "a registered model: dsf3n | dsf3n_paper "
                  "(the paper's Eq. 3-4)")]
  for k in defaults:
    if k in declared:
      fields.append(Field(f"model.{k}", defaults[k], *declared[k]))
    elif k.endswith("_kw"):  # a part's settings: checked against the part chosen (part_fields)
      kind = k[:-3]
      stock = {f.path.rsplit(".", 1)[1]: f.default for f in part_fields(kind, defaults[kind])}
      fields.append(Field(f"model.{k}", ml_collections.ConfigDict(stock), None,
                          f"the {kind}'s settings: its own fields (for {defaults[kind]!r}: "
                          f"{', '.join(stock) or 'none'}); a config that changes model.{kind} "
                          "sets these to that part's"))
  fields += [
      Field("model.visual_dim", 0, integer(0), "visual feature size; 0: from the data"),
      Field("model.audio_dim", 0, integer(0), "audio feature size; 0: from the data"),
      Field("model.dtype", "float32", choice(DTYPES), "compute dtype; bfloat16: bf16 compute, "
            "float32 parameters and optimiser state; float64 needs 64-bit JAX"),
  ]
  return fields


def _setting_rule(hint: Any, default: Any, least: float | None) -> Rule | None:
  """A part setting's rule from its type hint (or its default's type) and least value."""
  if get_origin(hint) is Literal:
    return choice(get_args(hint))
  kind = hint if isinstance(hint, type) else type(default)
  if kind is bool:
    return BOOL
  if kind is int:
    return integer(None if least is None else int(least))
  if kind is float:
    return number(least)
  if kind is str:
    return STRING
  if get_origin(hint) in (tuple, list, Sequence) or isinstance(default, (tuple, list)):
    # Sequences of ints (kernel sizes, widths); of anything else: not checked here.
    element = get_args(hint)[:1] or tuple({type(v) for v in default or ()})
    return positive_ints() if element and all(e is int for e in element) else None
  return None


def part_fields(kind: str, part: str) -> tuple[Field, ...]:
  """The fields ``model.<kind>_kw.<setting>`` of a registered part (none for a factory).

  Each is one of the part's dataclass fields (``models.registry.part_settings``):
  its default, a rule from its type hint and the part's ``settings_min``, and
  its help from the part's ``settings_help``, both optional class attributes.
  """
  from dsf3n_jax.models import registry  # pylint: disable=g-import-not-at-top
  settings = registry.part_settings(kind, part)
  if not settings:
    return ()
  cls = registry.lookup(kind, part)
  while isinstance(cls, functools.partial):
    cls = cls.func
  try:
    hints = get_type_hints(cls)
  except (NameError, TypeError):  # an annotation that does not resolve: the default's type
    hints = {}
  least = getattr(cls, "settings_min", {})
  helps = getattr(cls, "settings_help", {})
  return tuple(Field(f"model.{kind}_kw.{name}", default,
                     _setting_rule(hints.get(name), default, least.get(name)),
                     helps.get(name, f"{cls.__name__}.{name}"))
               for name, default in settings.items())


@functools.cache
def fields() -> tuple[Field, ...]:
  """Every field of the base config, in the order ``configs/default.py`` has them."""
  from dsf3n_jax.input_pipeline import DATASETS  # pylint: disable=g-import-not-at-top
  from dsf3n_jax.metrics import Distance  # pylint: disable=g-import-not-at-top
  node = ml_collections.ConfigDict
  out = [
      Field("seed", 0, integer(), "initialisation, dropout and shuffling seed"),
      # data (dsf3n_jax.input_pipeline.load_sources)
      Field("data.name", "synthetic", ((lambda v: isinstance(v, str) and bool(v.strip())),
                                       f"a dataset name: {', '.join(DATASETS)} or a registered "
                                       "TFDS dataset"),
            "the dataset (a registered TFDS name, or 'module:name')"),
      Field("data.path", "", STRING, "the file, for paired_features"),
      Field("data.data_dir", "", STRING, "TFDS data_dir ('' = TFDS's default)"),
      Field("data.num_classes", 0, integer(0), "0: from the data; otherwise checked against it"),
      Field("data.validation_fraction", 0.0, RATE, "carved from train, stratified, with "
            "validation_seed"),
      Field("data.validation_seed", 0, integer(0), "seed of the validation carve"),
      Field("data.validation_groups", "none", choice(("none", "duplicates")), "duplicates: "
            "train rows that share an exact visual or audio vector (an item paired more than "
            "once) are carved together, so validation holds no input train has"),
      Field("data.shuffle", True, BOOL, "False: file order, like the original"),
      Field("data.on_device", "auto", ((lambda v: str(v).lower() in ("auto", "true", "false")),
                                       "one of auto, true, false"),
            "the train split in device memory, chunks of steps as one compiled call; auto: on "
            "GPU/TPU, streamed batches on CPU"),
      Field("data.normalize", "none", choice(("none", "standardize")), "standardize: per "
            "feature, with the train split's statistics"),
      Field("data.synthetic", node(), None, "generate_synthetic's keyword arguments"),
      *_model_fields(),
      # loss (dsf3n_jax.losses)
      Field("loss.terms", node({"id": 1.0, "pair": 1e-4, "center": 5e-4}), None,
            "weighted loss terms by name (the original's L_id + alpha L_pair + beta L_center); "
            "losses.register_loss_term adds more"),
      Field("loss.id_form", "ce", choice(ID_FORMS), "the identity loss: ce | paper"),
      Field("loss.unimodal_weight", 0.0, number(0), "> 0: the same terms on each modality's "
            "embedding alone, times this weight, are added"),
      Field("loss.unimodal_terms", node(), None, "weights of that loss that differ from "
            "loss.terms (e.g. center)"),
      # optimisers: Adam on the network, SGD on the centres
      Field("optim.lr", 1e-4, number(0), "Adam's learning rate on the network"),
      Field("optim.b1", 0.5, RATE, "Adam's beta1"),
      Field("optim.b2", 0.999, RATE, "Adam's beta2"),
      Field("optim.eps", 1e-8, number(0, lo_open=True), "Adam's epsilon"),
      Field("optim.weight_decay", 0.0, number(0), "decoupled (AdamW) when > 0"),
      Field("optim.grad_clip_norm", 0.0, number(0), "global-norm clipping when > 0"),
      Field("optim.schedule", "constant", choice(SCHEDULES), "constant: the original's runs | "
            "warmup_step: 0.1 x the original's adjust_learning_rate | cosine: to 0"),
      Field("optim.center_lr", 0.05, number(0), "SGD's learning rate on the centres"),
      # batches, epochs, evaluation, checkpoints, selection
      Field("batch_size", 128, None, "global batch size (a multiple of the device count)"),
      Field("num_epochs", 40, integer(1), "epochs to train"),
      Field("eval_every_epochs", 5, integer(0), "the evaluators' default interval (and the "
            "last step); the original evaluates after 1-based epochs 6, 11, 16, ..."),
      Field("evals", node({"validation": {"type": "retrieval", "split": "validation"},
                           "test": {"type": "retrieval", "split": "test"}}), None,
            "what is evaluated (dsf3n_jax.evaluators): name -> {type, split, every_steps | "
            "every_epochs, the evaluator's settings}"),
      Field("checkpoint_every_epochs", 5, integer(0), "a checkpoint every N epochs (and at "
            "the end)"),
      Field("checkpoint_every_steps", 0, integer(0), "also every N global steps (0: off), with "
            "the data position: a preempted run loses at most N steps"),
      Field("steps_per_call", 0, integer(0), "with the train split on device: at most this many "
            "steps per compiled call (0: to the next action or epoch end)"),
      Field("profile_steps", (), STEP_RANGE, "(start, stop): a jax.profiler trace of steps "
            "start+1..stop into workdir/profile; stop past the run's last step is refused"),
      Field("keep_checkpoints", 2, integer(1), "the latest ones kept; the best one besides"),
      Field("checkpoint_optimizer_state", True, BOOL, "False: about a third of the size; a "
            "resume then starts Adam afresh (not bit for bit)"),
      Field("allow_resume_mismatch", False, BOOL, "resume a workdir trained on other data or "
            "with another loss config (e.g. to fine-tune)"),
      Field("log_every_steps", 50, integer(0), "a progress line every N steps"),
      Field("selection_split", "validation", choice(SELECTION_SPLITS), "the evaluator the best "
            "checkpoint is selected on (validation falls back to test when none is carved); "
            "last: none, the final state is the best (a refit on train + validation)"),
      Field("selection_metric", "map_average", SELECTION, "map_average (paired) | "
            "unimodal_map_average (each modality alone) | '<eval name>/<metric>'"),
      Field("selection_mode", "auto", choice(SELECTION_MODES), "max: the highest "
            "selection_metric is the best, min: the lowest; auto: min for a loss (a metric "
            "named loss or *_loss), else max"),
      Field("early_stopping_patience", 0, integer(0), "stop after N evaluations in a row "
            "without a strictly lower selection loss; 0: off"),
      Field("eval_batch_size", 1024, None, "global evaluation batch size (a multiple of the "
            "device count)"),
      # the retrieval metric (dsf3n_jax.metrics)
      Field("metric.distance", "cosine", choice(get_args(Distance)), "the ranking's distance"),
      Field("metric.k", 0, integer(0), "mAP@k; 0: all items (the paper's mAP)"),
      Field("metric.original_test_batches", 0, integer(0), "N: only the items the original's "
            "evaluation saw (batches of N in file order, the partial one dropped)"),
      # several hosts (dsf3n_jax.distributed); empty: automatic or one process
      Field("distributed.coordinator_address", "", STRING, "host:port of process 0"),
      Field("distributed.num_processes", 0, integer(0), "number of processes"),
      Field("distributed.process_id", -1, integer(-1), "this process's index"),
      Field("distributed.initialization_timeout", 300, integer(1), "seconds to reach the "
            "coordinator"),
      Field("distributed.heartbeat_timeout", 100, integer(1), "seconds before a silent peer "
            "ends the job"),
  ]
  return tuple(out)


def default(path: str) -> Any:
  """The declared default of the field at ``path`` (a mapping as a plain dict)."""
  (field,) = [f for f in fields() if f.path == path]
  value = field.default
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def default_part(kind: str) -> str:
  """The part ``config.model.<kind>`` names by default."""
  return default(f"model.{kind}")


def rules() -> tuple[tuple[str, Rule], ...]:
  """``(path, rule)`` of every field checked on its own."""
  return tuple((f.path, f.rule) for f in fields() if f.rule is not None)


def defaults() -> ml_collections.ConfigDict:
  """The base config: every field at its default (fresh copies of mutable defaults)."""
  config = ml_collections.ConfigDict()
  for field in fields():
    *parents, name = field.path.split(".")
    node = config
    for parent in parents:
      if parent not in node:
        node[parent] = ml_collections.ConfigDict()
      node = node[parent]
    value = field.default
    if isinstance(value, ml_collections.ConfigDict):
      value = ml_collections.ConfigDict(value.to_dict())
    node[name] = value
  return config


def describe() -> str:
  """One line per field: path, default, what it accepts, help."""
  lines = []
  for f in fields():
    default = f.default.to_dict() if isinstance(f.default, ml_collections.ConfigDict) else (
        f.default)
    accepts = f.rule[1] if f.rule else "(checked with the fields it depends on)"
    lines.append(f"{f.path} = {default!r}: {accepts}. {f.help}")
    if f.path.endswith("_kw") and f.path.startswith("model."):
      kind = f.path[len("model."):-3]
      for s in part_fields(kind, default_part(kind)):
        lines.append(f"  {s.path} = {s.default!r}: {s.rule[1] if s.rule else 'any value'}. "
                     f"{s.help}")
  return "\n".join(lines)


if __name__ == "__main__":
  print(describe())
