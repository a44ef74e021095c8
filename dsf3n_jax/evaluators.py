"""Evaluators: what a run measures, by name in ``config.evals`` (as big_vision's ``config.evals``).

``config.evals`` maps a name to an evaluator's settings::

  config.evals.test = dict(type="retrieval", split="test")          # every eval_every_epochs
  config.evals.recall = dict(type="precision_recall", split="test", ks=(1, 5), every_steps=200)

Each entry has ``type`` (a registered evaluator), ``split`` (train, validation
or test) and optionally ``every_steps`` or ``every_epochs`` (default: the
config's ``eval_every_epochs``; 0: only at the end); every evaluator also runs
after the last step. Its other keys are the evaluator's own settings. An
evaluator of the validation split is skipped when the run carves none.

The values are written to ``metrics.jsonl`` (``split`` is the evaluator's
name; a final evaluation's record has ``final``, a digest of its settings), to
TensorBoard as ``<name>/<metric>`` and to ``results.json`` (``final.<name>``).
``config.selection_metric = "<name>/<metric>"`` selects the best checkpoint by
one of them.

A user adds an evaluator in their own module, imported by their config file::

  @evaluators.register_evaluator("median_rank")
  class MedianRank:
    def __init__(self, run, *, split, **settings): ...
    def __call__(self, ctx: evaluators.EvalContext) -> dict[str, float]: ...

``run`` is the run's ``training.run.Run`` (config, sources, model, mesh);
``ctx.outputs(protocol)`` holds the eval-mode outputs of every item of the
split for the protocol(s) asked (paired, unimodal or both; shared by the
evaluators of one split at one step, each protocol embedded once), and
``ctx.state`` the train state.

An evaluation computes only what it reports. The built-in evaluators'
``protocol`` defaults to ``"auto"``: both protocols at the run's last
evaluation; before it, the protocol of the selection metric (paired for
``map_average``, unimodal for ``unimodal_map_average``), plus the paired
outputs when early stopping needs the selection loss.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np

from dsf3n_jax import config_schema, metrics, registry

SPLITS = ("train", "validation", "test")
SCHEDULE_KEYS = ("type", "split", "every_steps", "every_epochs")

Evaluator = Callable[["EvalContext"], Mapping[str, float]]


def register_evaluator(name: str) -> Callable[[Any], Any]:
  """Decorator: registers ``factory(run, *, split, **settings) -> evaluator`` as ``name``.

  A class whose ``__init__`` takes those arguments and whose ``__call__(ctx)``
  returns ``{metric: float}`` is such a factory.
  """
  return registry.register("evaluator", name)


@dataclasses.dataclass
class EvalContext:
  """What an evaluator sees: the run, the state, the step, and the split's outputs."""

  run: Any  # training.run.Run
  state: Any  # training.state.TrainState
  step: int
  split: str
  _outputs: Callable[[str, str], dict[str, np.ndarray]]
  final: bool = True  # the run's last evaluation (the one results.json reports)

  @property
  def source(self):
    return getattr(self.run.sources, self.split)

  def outputs(self, protocol: str = "both") -> dict[str, np.ndarray]:
    """Eval-mode outputs of every item the evaluation counts (``steps.evaluated_items``: on
    the test split with ``config.metric.original_test_batches``, the original's): ``label``,
    ``index`` and the keys of ``protocol`` (``steps.PROTOCOL_KEYS``: paired, unimodal or
    both). Every evaluator of a split sees the same items."""
    from dsf3n_jax.training import steps  # pylint: disable=g-import-not-at-top
    return steps.evaluated_items(self._outputs(self.split, protocol), self.run.config,
                                 self.split)


def resolve_protocol(protocol: str, ctx: EvalContext) -> str:
  """An evaluator's ``protocol`` setting at this evaluation: ``"auto"`` is both at the last
  evaluation and what selection needs before it (module docstring); others as they are."""
  if protocol != "auto":
    return protocol
  config = ctx.run.config
  if ctx.final:
    return "both"
  selected = "unimodal" if ctx.run.metric.startswith("unimodal_") else "paired"
  if selected == "unimodal" and config.get("early_stopping_patience", 0):
    return "both"  # early stopping compares the selection evaluator's (paired) loss
  return selected


@dataclasses.dataclass(frozen=True)
class Spec:
  """One entry of ``config.evals``: its name, type, split, schedule and own settings."""

  name: str
  type: str
  split: str
  every_steps: int  # 0: every_epochs applies
  every_epochs: int  # its own, or the config's eval_every_epochs; 0: only at the end
  settings: Mapping[str, Any]


def specs(config) -> list[Spec]:
  """``config.evals`` as ``Spec``s (checked by ``config_check``), in the config's order.

  A config without ``evals`` (written before it existed) gets the declared
  default (``config_schema``): ``retrieval`` on the validation and the test split.
  """
  evals = config.get("evals")
  if evals is None:
    evals = config_schema.default("evals")
  default_epochs = config.get("eval_every_epochs", config_schema.default("eval_every_epochs"))
  out = []
  for name, entry in evals.items():
    entry = dict(entry)
    epochs = entry.get("every_epochs")
    out.append(Spec(name=name, type=entry["type"], split=entry.get("split", name),
                    every_steps=int(entry.get("every_steps", 0) or 0),
                    every_epochs=int(default_epochs if epochs is None else epochs),
                    settings={k: v for k, v in entry.items() if k not in SCHEDULE_KEYS}))
  return out


def build(spec: Spec, run) -> Evaluator:
  """The evaluator of ``spec`` for ``run``; a bad setting is a ``ValueError`` naming it."""
  factory = registry.lookup("evaluator", spec.type, where=f"config.evals.{spec.name}.type")
  try:
    inspect.signature(factory).bind(run, split=spec.split, **spec.settings)
  except TypeError as e:
    raise ValueError(f"config.evals.{spec.name}: {e} (the settings of evaluator "
                     f"{spec.type!r}: {_parameters(factory)})") from e
  try:
    return factory(run, split=spec.split, **spec.settings)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.evals.{spec.name}: {e}") from e


def _parameters(factory) -> str:
  params = [p for p in inspect.signature(factory).parameters.values()
            if p.kind == p.KEYWORD_ONLY and p.name != "split"]
  return ", ".join(f"{p.name}={p.default!r}" for p in params) or "none"


# -- built-in evaluators ---------------------------------------------------------------------

def _last_protocols(protocol: str) -> tuple[str, ...]:
  """The protocols an evaluator of ``protocol`` computes at the run's last evaluation
  (``resolve_protocol``: "auto" is both there)."""
  from dsf3n_jax.training import steps  # pylint: disable=g-import-not-at-top
  return steps.protocols_of("both" if protocol == "auto" else protocol)


def _loss_names(loss_parts: Collection[str]) -> set[str]:
  """The names ``steps.loss_metrics`` reports: the loss, its parts and the accuracies."""
  return {"loss", *loss_parts, "accuracy_visual", "accuracy_audio"}


class _WithLoss:
  """An evaluator of one split that computes the run's loss (its terms, or its ``loss_fn``)."""

  def __init__(self, run, *, split: str):
    self.split = split
    self.loss_fn = run.eval_loss_fn


def _check_protocol(protocol: str) -> str:
  """An evaluator's ``protocol`` setting: one of ``steps.PROTOCOLS``, or ``"auto"``."""
  from dsf3n_jax.training import steps  # pylint: disable=g-import-not-at-top
  if protocol != "auto" and protocol not in steps.PROTOCOLS:
    raise ValueError(f"protocol={protocol!r}: expected one of "
                     f"{', '.join((*steps.PROTOCOLS, 'auto'))}")
  return protocol


@register_evaluator("retrieval")
class Retrieval(_WithLoss):
  """The paper's metrics (``steps.evaluate``): mAP of ``protocol`` (paired, unimodal, both or
  auto), with the loss parts and accuracy of the paired outputs when they are computed."""

  def __init__(self, run, *, split: str, protocol: str = "auto"):
    super().__init__(run, split=split)
    self.protocol = _check_protocol(protocol)

  def reports(self, loss_parts: Collection[str]) -> set[str]:
    """Every metric it reports at the run's last evaluation (``loss_parts``: the names of the
    run's loss parts), for the check of ``config.selection_metric`` before training."""
    from dsf3n_jax.training import steps  # pylint: disable=g-import-not-at-top
    protocols = _last_protocols(self.protocol)
    names = {f"{steps.PREFIXES[p]}map_{key}" for p in protocols for key in steps.MAP_KEYS}
    if "paired" in protocols:
      names |= _loss_names(loss_parts)
    return names | {"num_examples"}

  def __call__(self, ctx: EvalContext) -> dict[str, float]:
    from dsf3n_jax.training import steps  # pylint: disable=g-import-not-at-top
    protocol = resolve_protocol(self.protocol, ctx)
    return steps.evaluate(None, ctx.state, ctx.source, config=ctx.run.config, mesh=ctx.run.mesh,
                          split=self.split, loss_fn=self.loss_fn,
                          outputs=ctx.outputs(protocol), protocol=protocol)


@register_evaluator("loss")
class Loss(_WithLoss):
  """The loss parts and the classifiers' accuracy on the whole split (no ranking)."""

  def reports(self, loss_parts: Collection[str]) -> set[str]:
    """Every metric it reports (``Retrieval.reports``)."""
    return _loss_names(loss_parts)

  def __call__(self, ctx: EvalContext) -> dict[str, float]:
    from dsf3n_jax.training import steps  # pylint: disable=g-import-not-at-top
    return steps.loss_metrics(ctx.outputs("paired"), ctx.state, loss_fn=self.loss_fn)


@register_evaluator("precision_recall")
class PrecisionRecall:
  """Precision@K and recall@K of cross-modal retrieval, each direction and their average.

  ``metrics.precision_at_k`` / ``recall_at_k`` (the metric's distance; ties
  ranked by item index). Keys: ``precision_at_K_audio_to_visual``, ...,
  ``precision_at_K`` (the two directions' mean), with ``unimodal_`` before
  them for the unimodal protocol (no ``@``: TensorBoard's tags could not hold
  it). ``protocol``: paired, unimodal, both or auto.
  """

  def __init__(self, run, *, split: str, ks=(1, 5, 10), protocol: str = "auto"):
    ks = tuple(ks) if isinstance(ks, (list, tuple)) else (ks,)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
      raise ValueError(f"ks={ks!r}: expected positive ints")
    self.split, self.ks, self.protocol = split, ks, _check_protocol(protocol)
    self.distance = run.config.metric.distance

  def reports(self, loss_parts: Collection[str]) -> set[str]:
    """Every metric it reports at the run's last evaluation (``Retrieval.reports``)."""
    del loss_parts
    from dsf3n_jax.training import steps  # pylint: disable=g-import-not-at-top
    return {f"{steps.PREFIXES[p]}{what}_at_{k}{suffix}"
            for p in _last_protocols(self.protocol) for what in ("precision", "recall")
            for k in self.ks for suffix in ("", *(f"_{d}" for d in steps.MAP_KEYS[:2]))}

  def __call__(self, ctx: EvalContext) -> dict[str, float]:
    from dsf3n_jax.training import steps  # pylint: disable=g-import-not-at-top
    protocol = resolve_protocol(self.protocol, ctx)
    out = ctx.outputs(protocol)
    labels = out["label"]
    result = {}
    for prefix in (steps.PREFIXES[p] for p in steps.protocols_of(protocol)):
      visual, audio = out[f"{prefix}emb_visual"], out[f"{prefix}emb_audio"]
      finite = bool(np.isfinite(visual).all() and np.isfinite(audio).all())
      for k in self.ks:
        k_eff = min(k, len(labels))
        for what, fn in (("precision", metrics.precision_at_k), ("recall", metrics.recall_at_k)):
          both = []
          for direction, queries, items in (("audio_to_visual", audio, visual),
                                            ("visual_to_audio", visual, audio)):
            # A diverged state: NaN scores, as the retrieval evaluator reports them (the
            # loop then names the evaluation as non-finite).
            value = float(np.mean(fn(queries, items, labels, labels, k=k_eff,
                                     distance=self.distance))) if finite else float("nan")
            result[f"{prefix}{what}_at_{k}_{direction}"] = value
            both.append(value)
          result[f"{prefix}{what}_at_{k}"] = float(np.mean(both))
    return result
