"""Models and model parts chosen by name: ``config.model.{name,fusion,head,classifier}``.

A user adds a part with one decorator in their own module, which their config
file imports (so it is registered before the run starts)::

  @registry.register_fusion("gated_sum")
  class GatedSum(nn.Module): ...

What is registered under a kind:

* ``"model"``: a module class or ``functools.partial`` of one (a preset), called
  with the resolved ``config.model`` fields; ``DSF3N`` is ``"dsf3n"``.
* ``"fusion"``, ``"head"``, ``"classifier"``: a module class or partial of one
  (a ``ModuleDef``), or a function ``model -> ModuleDef`` for a part that needs
  the model's own settings (e.g. its ``axis_name``). A part's settings are its
  dataclass fields (``part_settings``), set by ``config.model.<kind>_kw`` (e.g.
  ``config.model.fusion_kw.num_stages``) and checked against the part's type
  hints; the model gives ``dtype``, ``param_dtype``, ``dropout_rate`` (to a part
  that has it) and the head's ``features`` / the classifier's ``num_classes``.
  ``DSF3N``'s docstring says how each part is constructed and called.
* ``"loss_term"``: a ``losses.LossTerm`` (``losses.register_loss_term``).

The names are saved with every checkpoint, so restoring rebuilds what was
trained (the module registering a custom part must be imported first).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from flax import linen as nn

# The generic registry (dsf3n_jax.registry), re-exported: the model's parts are looked up here.
from dsf3n_jax.registry import (  # noqa: F401
    IMPORT_HINT,
    KINDS,
    PARTS,
    lookup,
    names,
    register,
    replacements,
)

ModuleDef = Any  # a Module class or a functools.partial of one

register_model = functools.partial(register, "model")
register_fusion = functools.partial(register, "fusion")
register_head = functools.partial(register, "head")
register_classifier = functools.partial(register, "classifier")


def model_fields(model_def: ModuleDef) -> dict[str, Any]:
  """The ``config.model`` fields a model class (or partial of one) takes, with defaults
  (``dataclasses.MISSING`` for one without)."""
  cls = model_def.func if isinstance(model_def, functools.partial) else model_def
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.name not in ("parent", "name", "axis_name")}


def is_module_def(obj: Any) -> bool:
  """A Module class or a ``functools.partial`` of one."""
  if isinstance(obj, functools.partial):
    return is_module_def(obj.func)
  return isinstance(obj, type) and issubclass(obj, nn.Module)


# What the model gives every part (not settings of the part), and what it gives one kind.
MODEL_GIVEN = ("parent", "name", "dtype", "param_dtype", "axis_name", "dropout_rate")
KIND_GIVEN = {"fusion": (), "head": ("features",), "classifier": ("num_classes",)}


def _unwrap(module_def: ModuleDef) -> tuple[type, dict[str, Any]]:
  """The Module class of a ``ModuleDef`` and the keywords its partials set."""
  keywords: dict[str, Any] = {}
  while isinstance(module_def, functools.partial):
    keywords = {**module_def.keywords, **keywords}
    module_def = module_def.func
  return module_def, keywords


def part_settings(kind: str, part: str | ModuleDef) -> dict[str, Any] | None:
  """A part's settings (``config.model.<kind>_kw``) and their defaults.

  The settings are the part's dataclass fields, less what the model gives
  (``MODEL_GIVEN``, ``KIND_GIVEN``); a partial's keywords are their defaults.
  ``dataclasses.MISSING`` marks one without a default. None: a factory
  (``model -> ModuleDef``), whose settings are known once it is built.
  """
  entry = lookup(kind, part, where=f"config.model.{kind}") if isinstance(part, str) else part
  if not is_module_def(entry):
    return None
  cls, keywords = _unwrap(entry)
  out = {}
  for f in dataclasses.fields(cls):
    if not f.init or f.name in MODEL_GIVEN or f.name in KIND_GIVEN.get(kind, ()):
      continue
    default = f.default
    if f.default_factory is not dataclasses.MISSING:
      default = f.default_factory()
    out[f.name] = keywords.get(f.name, default)
  return out


def settings_problems(kind: str, name: str, settings: dict[str, Any] | None, kw: Any, *,
                      where: str = "config.model") -> list[str]:
  """One message per key of ``kw`` (``<where>.<kind>_kw``) that the part ``name`` does not
  take."""
  if settings is None:
    return []
  out = []
  for key in kw:
    if key in MODEL_GIVEN or key in KIND_GIVEN.get(kind, ()):
      giver = f"{where}.{key}" if key == "dropout_rate" else "the model"
      out.append(f"{where}.{kind}_kw.{key}: given by {giver}, not a setting of the {kind}")
    elif key not in settings:
      takes = ", ".join(settings) or "no settings"
      out.append(f"{where}.{kind}_kw.{key}: not a setting of {kind} {name!r} (it takes: "
                 f"{takes}); a config that changes model.{kind} sets model.{kind}_kw to that "
                 "part's settings")
  return out


def resolve_part(kind: str, part: str | ModuleDef, model: nn.Module) -> ModuleDef:
  """The ``ModuleDef`` of a model part given by name or directly, with its settings.

  Args:
    kind: "fusion", "head" or "classifier".
    part: a registered name, or a ``ModuleDef``.
    model: the model the part belongs to; a registered factory is called with
      it. Its ``<kind>_kw`` are the part's settings, and its ``dropout_rate`` and
      ``axis_name`` go to a part with that field (unless the ``ModuleDef`` sets it).
  """
  if kind not in PARTS:
    raise ValueError(f"kind: expected one of {', '.join(PARTS)}, got {kind!r}")
  if not isinstance(part, str):
    if not is_module_def(part):
      raise TypeError(f"{kind}: expected a registered name or a Module class (or partial of "
                      f"one), got {part!r}")
    module_def = part
  else:
    entry = lookup(kind, part, where=f"model.{kind}")
    module_def = entry if is_module_def(entry) else entry(model)
    if not is_module_def(module_def):
      raise TypeError(f"{kind} {part!r}: its factory returned {module_def!r}, expected a Module "
                      "class or a partial of one")
  kw = dict(getattr(model, f"{kind}_kw", None) or {})
  name = part if isinstance(part, str) else _unwrap(part)[0].__name__
  problems = settings_problems(kind, name, part_settings(kind, module_def), kw, where="model")
  if problems:
    raise ValueError("; ".join(problems))
  cls, keywords = _unwrap(module_def)
  fields = {f.name for f in dataclasses.fields(cls)}
  for given in ("dropout_rate", "axis_name"):  # a part's BatchNorm syncs over the model's axis
    if given in fields and given not in keywords:
      kw[given] = getattr(model, given)
  return functools.partial(module_def, **kw) if kw else module_def
