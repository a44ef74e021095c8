"""What users plug in by name: models and their parts, loss terms, evaluators.

One registry for every kind of extension point. A user's module registers a
class, partial or factory under a name (``register(kind, name)``, or the
kinds' own decorators: ``models.registry.register_fusion``,
``losses.register_loss_term``, ``evaluators.register_evaluator``); a config
names it, and ``lookup`` finds it, importing ``module`` first for a name given
as ``"module:name"`` (so a process that did not run the config file, e.g.
``retrieve`` on a saved run, finds a user's part).
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from typing import Any

PARTS = ("fusion", "head", "classifier")
KINDS = ("model", *PARTS, "loss_term", "evaluator")

IMPORT_HINT = ("a module registering another must be imported first, e.g. by the config file; "
               "or name it as 'module:name'")

_REGISTRY: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_replaced = 0  # registrations that gave a name another object (``replacements``)


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def _origin(obj: Any) -> str:
  obj = obj.func if isinstance(obj, functools.partial) else obj
  return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _identity(obj: Any) -> tuple:
  """What tells one registration from another: a partial's function and arguments; a class's
  or function's module and qualified name, and a lambda's source line too (the lambdas of a
  module share one name). The same identity again is a module imported or reloaded twice
  (an edited function keeps its name; an argument's repr loses its memory address)."""
  if isinstance(obj, functools.partial):
    return ("partial", _identity(obj.func),
            *(re.sub(r" at 0x[0-9a-fA-F]+", "", repr(a))
              for a in (obj.args, sorted(obj.keywords.items()))))
  fn = getattr(obj, "__wrapped__", obj)  # a loss term's function
  code = getattr(fn, "__code__", None)
  lambda_line = (code.co_firstlineno if code is not None
                 and getattr(fn, "__name__", "") == "<lambda>" else None)
  return (_origin(obj), lambda_line)


def register(kind: str, name: str) -> Callable[[Any], Any]:
  """Decorator registering a class, partial or factory as ``name`` of ``kind``.

  Registering a name again is an error, unless the new object is the same one
  (``_identity``: a module imported or reloaded twice); a preset of a stock part
  under its name is refused, as it would change what a saved run rebuilds as.
  A ``loss_term`` is a ``losses.LossTerm`` (``losses.register_loss_term`` makes one).

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
    if kind == "loss_term":
      from dsf3n_jax import losses  # pylint: disable=g-import-not-at-top
      if not isinstance(obj, losses.LossTerm):
        raise TypeError(f"loss_term {name!r}: expected a losses.LossTerm, got "
                        f"{type(obj).__name__} (register a function with "
                        "losses.register_loss_term, which makes one)")
    old = _REGISTRY[kind].get(name)
    if old is not None and _identity(old) != _identity(obj):
      raise ValueError(f"{kind} {name!r} is already registered ({_origin(old)}); register "
                       f"{_origin(obj)} under another name")
    if old is not None and old is not obj:
      global _replaced
      _replaced += 1
    _REGISTRY[kind][name] = obj
    return obj

  return decorator


def replacements() -> int:
  """How many registrations have given a registered name another object (a module
  reloaded after an edit registers its parts again). Programs built from names
  (``training.state.memoized``) are built anew after one."""
  return _replaced


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
    except Exception as e:  # noqa: BLE001 - a user's module: missing, or raising, or not Python
      cause = str(e) if isinstance(e, ImportError) else f"{type(e).__name__}: {e}"
      raise ValueError(f"{where or kind}={name!r}: cannot import {module!r} ({cause})") from e
  for key in (name, name.split(":", 1)[-1]) if isinstance(name, str) else ():
    if key in _REGISTRY[kind]:
      return _REGISTRY[kind][key]
  raise ValueError(f"{where or kind}={name!r}: unknown {kind}; registered: "
                   f"{', '.join(names(kind))} ({IMPORT_HINT})")
