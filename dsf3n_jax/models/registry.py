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
import importlib
from collections.abc import Callable
from typing import Any

from flax import linen as nn

PARTS = ("fusion", "head", "classifier")
KINDS = ("model", *PARTS, "loss_term")

ModuleDef = Any  # a Module class or a functools.partial of one
IMPORT_HINT = ("a module registering another must be imported first, e.g. by the config file; "
               "or name it as 'module:name'")

_REGISTRY: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def _origin(obj: Any) -> str:
  obj = obj.func if isinstance(obj, functools.partial) else obj
  return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def register(kind: str, name: str) -> Callable[[Any], Any]:
  """Decorator registering a class, partial or factory as ``name`` of ``kind``.

  Registering a name again is an error, unless the new object has the same
  module and qualified name (a module imported or reloaded twice).

  Returns:
    A decorator that registers its argument and returns it unchanged.
  """
  _check_kind(kind)
  if not isinstance(name, str) or not name:
    raise ValueError(f"{kind} name: expected a non-empty string, got {name!r}")

  def decorator(obj):
    if not callable(obj):
      raise TypeError(f"{kind} {name!r}: expected a module class, partial or function, got "
                      f"{type(obj).__name__}")
    old = _REGISTRY[kind].get(name)
    if old is not None and _origin(old) != _origin(obj):
      raise ValueError(f"{kind} {name!r} is already registered ({_origin(old)})")
    _REGISTRY[kind][name] = obj
    return obj

  return decorator


register_model = functools.partial(register, "model")
register_fusion = functools.partial(register, "fusion")
register_head = functools.partial(register, "head")
register_classifier = functools.partial(register, "classifier")


def names(kind: str) -> tuple[str, ...]:
  """The registered names of ``kind``, sorted."""
  _check_kind(kind)
  return tuple(sorted(_REGISTRY[kind]))


def lookup(kind: str, name: str, *, where: str | None = None) -> Any:
  """What is registered as ``name`` of ``kind``.

  Args:
    kind: "model", "fusion", "head", "classifier" or "loss_term".
    name: the registered name; ``"module:name"`` imports ``module`` first and
      then finds ``name`` (so that a process that did not run the config file,
      e.g. ``retrieve`` on a saved run, finds a user's part).
    where: what the error names (default ``kind``), e.g. ``"config.model.fusion"``.

  Raises:
    ValueError: one line naming ``where``, the name and the registered names.
  """
  _check_kind(kind)
  if isinstance(name, str) and ":" in name and name not in _REGISTRY[kind]:
    module = name.split(":", 1)[0]  # "my_fusion:gated_sum": importing my_fusion registers it
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ValueError(f"{where or kind}={name!r}: cannot import {module!r} ({e})") from e
  for key in (name, name.split(":", 1)[-1]) if isinstance(name, str) else ():
    if key in _REGISTRY[kind]:
      return _REGISTRY[kind][key]
  raise ValueError(f"{where or kind}={name!r}: unknown {kind}; registered: "
                   f"{', '.join(names(kind))} ({IMPORT_HINT})")


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
