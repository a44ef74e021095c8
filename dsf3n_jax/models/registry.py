"""Models and model parts chosen by name: ``config.model.{name,fusion,head,classifier}``.

A user adds a part with one decorator in their own module, which their config
file imports (so it is registered before the run starts)::

  @registry.register_fusion("gated_sum")
  class GatedSum(nn.Module): ...

What is registered under a kind:

* ``"model"``: a module class or ``functools.partial`` of one (a preset), called
  with the resolved ``config.model`` fields; ``DSF3N`` is ``"dsf3n"``.
* ``"fusion"``, ``"head"``, ``"classifier"``: a module class or partial of one
  (a ``ModuleDef``), or a function ``model -> ModuleDef`` for a part whose
  settings come from the model's fields (the stock parts do this, e.g. the MFA
  fusion reads ``num_fusion_stages``). ``DSF3N``'s docstring says how each part
  is constructed and called.
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
from dsf3n_jax.registry import IMPORT_HINT, KINDS, PARTS, lookup, names, register  # noqa: F401

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


def resolve_part(kind: str, part: str | ModuleDef, model: nn.Module) -> ModuleDef:
  """The ``ModuleDef`` of a model part given by name or directly.

  Args:
    kind: "fusion", "head" or "classifier".
    part: a registered name, or a ``ModuleDef`` (used as is).
    model: the model the part belongs to; a registered factory is called with it.
  """
  if kind not in PARTS:
    raise ValueError(f"kind: expected one of {', '.join(PARTS)}, got {kind!r}")
  if not isinstance(part, str):
    if not is_module_def(part):
      raise TypeError(f"{kind}: expected a registered name or a Module class (or partial of "
                      f"one), got {part!r}")
    return part
  entry = lookup(kind, part, where=f"model.{kind}")
  module_def = entry if is_module_def(entry) else entry(model)
  if not is_module_def(module_def):
    raise TypeError(f"{kind} {part!r}: its factory returned {module_def!r}, expected a Module "
                    "class or a partial of one")
  return module_def
