"""The key and layout mapping between the original's PyTorch state dict and our Flax variables.

A Dense kernel (in, out) is the torch weight (out, in) transposed; a Conv
kernel (k, in, out) is the torch weight (out, in, k) transposed (2, 1, 0); the
bilinear kernel (in1, in2, out) is the torch weight (out, in1, in2) transposed
(1, 2, 0). ``dsf3n_jax.convert`` is the public face (and the files and command
line); this module derives the mapping from the Flax variable tree.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

# Flax module path prefix -> torch module prefix. The longest matching prefix wins; module
# names after it are kept (the fine-grained convolutions ``conv{k}_{i}`` share their names).
_MODULE_PREFIXES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("visual_encoder", "dense"), "visual_layer.visual_encoder"),
    (("audio_encoder", "dense"), "audio_layer.audio_encoder"),
    (("visual_fine_grained", "bn"), "visual_fine_grained_feature.BN"),
    (("visual_fine_grained", "stem"), "visual_fine_grained_feature.conv1"),
    (("visual_fine_grained",), "visual_fine_grained_feature"),
    (("audio_fine_grained", "bn"), "audio_fine_grained_feature.BN"),
    (("audio_fine_grained", "stem"), "audio_fine_grained_feature.conv1"),
    (("audio_fine_grained",), "audio_fine_grained_feature"),
    (("fusion", "mfa", "bilinear"), "MmFA.joint_attention_map"),
    (("fusion", "mfa"), "MmFA"),
    (("head", "hidden"), "out_layer.0"),
    (("head", "out"), "out_layer.3"),
    (("visual_classifier", "hidden"), "classifier_visual.classifier.0"),
    (("visual_classifier", "logits"), "classifier_visual.classifier.3"),
    (("audio_classifier", "hidden"), "classifier_audio.classifier.0"),
    (("audio_classifier", "logits"), "classifier_audio.classifier.3"),
)
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("params", "t_c"): "t_c",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_NUM_CLASSES_KEY = "classifier_visual.classifier.3.weight"


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (str(key),)))
    else:
      out[prefix + (str(key),)] = value
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree


def _torch_name(collection: str, path: tuple[str, ...]) -> tuple[str, str]:
  """(torch key, layout) of the Flax leaf ``collection/path``."""
  modules, leaf = path[:-1], path[-1]
  best = max((p for p in _MODULE_PREFIXES if modules[:len(p[0])] == p[0]),
             key=lambda p: len(p[0]), default=None)
  leaf_name = _LEAF_NAMES.get((collection, leaf))
  if best is None or leaf_name is None:
    raise ValueError(f"no torch name for Flax variable {collection}/{'/'.join(path)}: only the "
                     "original DSF3N (fusion 'mfa', head 'mlp', classifier 'mlp') converts")
  torch_modules = [best[1], *modules[len(best[0]):]]
  layout = "copy"
  if leaf == "kernel":
    layout = "bilinear" if modules[-1] == "bilinear" else "kernel"
  return ".".join(torch_modules + [leaf_name]), layout


def _to_torch_layout(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "bilinear":  # (in1, in2, out) -> (out, in1, in2)
    return np.transpose(x, (2, 0, 1))
  if layout == "kernel":  # Dense (in, out) -> (out, in); Conv (k, in, out) -> (out, in, k)
    return np.transpose(x, tuple(reversed(range(x.ndim))))
  return x


def _from_torch_layout(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "bilinear":  # (out, in1, in2) -> (in1, in2, out)
    return np.transpose(x, (1, 2, 0))
  if layout == "kernel":
    return np.transpose(x, tuple(reversed(range(x.ndim))))
  return x


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; torch itself is not imported here
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # numpy has none; float32 holds it exactly
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def _as_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """``{"params", ["batch_stats"]}`` from variables or a bare params (e.g. gradient) tree."""
  if hasattr(variables, "unfreeze"):
    variables = variables.unfreeze()
  if "params" in variables:
    unknown = sorted(set(variables) - {"params", "batch_stats"})
    if unknown:
      raise ValueError(f"variables: unexpected collections {unknown}; expected 'params' and "
                       "optionally 'batch_stats'")
    return dict(variables)
  return {"params": variables}


def torch_key_map(variables: Mapping[str, Any]) -> dict[str, tuple[str, tuple[str, ...], str]]:
  """The torch key of every Flax variable.

  Args:
    variables: ``{"params", "batch_stats"}`` (arrays or shape structs), or a
      bare params tree.

  Returns:
    ``{torch_key: (collection, flax_path, layout)}`` in the tree's order.
  """
  out = {}
  for collection, tree in _as_variables(variables).items():
    for path in _flatten(tree):
      key, layout = _torch_name(collection, path)
      out[key] = (collection, path, layout)
  return out


def num_batches_tracked_keys(variables: Mapping[str, Any]) -> list[str]:
  """The torch keys of the ``num_batches_tracked`` buffers ``to_torch_state_dict`` writes for
  ``variables`` (one per BatchNorm; none without ``batch_stats``)."""
  return [_tracked_key(key) for key, (c, _, _) in torch_key_map(variables).items()
          if c == "batch_stats" and key.endswith(".running_var")]


def _tracked_key(running_var_key: str) -> str:
  return running_var_key[:-len("running_var")] + "num_batches_tracked"


def to_torch_state_dict(variables: Mapping[str, Any], *,
                        num_batches_tracked: int | Mapping[str, int] = 0
                        ) -> dict[str, np.ndarray]:
  """Our variables as the original's state dict (numpy arrays, same dtypes).

  Args:
    variables: ``{"params": ..., "batch_stats": ...}``, ``{"params": ...}``,
      or a bare params tree (for example gradients); keys follow the tree, so
      a params-only tree gives no ``BN.running_*`` (and no ``num_batches_tracked``)
      entries.
    num_batches_tracked: written as every BatchNorm's ``num_batches_tracked``
      (an int64 scalar, after its ``running_var``), where ``batch_stats`` are
      given. PyTorch counts one per train-mode forward of the layer, and each
      BatchNorm of DSF3N runs once per step, so pass the run's number of
      training steps (``TrainState.step``); 0 is untrained weights. A mapping
      gives each BatchNorm its own count by torch key
      (``visual_fine_grained_feature.BN.num_batches_tracked``: those a ``.pth``
      had, ``num_batches_tracked_of``); it must hold every BatchNorm's.

  Returns:
    ``{torch_key: array}``.
  """
  counts = num_batches_tracked
  if isinstance(counts, Mapping):
    missing = sorted(set(num_batches_tracked_keys(variables)) - set(counts))
    if missing:
      raise ValueError(f"num_batches_tracked: no count for {missing}; expected one for every "
                       "BatchNorm")
    negative = {k: int(v) for k, v in counts.items() if int(v) < 0}
    if negative:
      raise ValueError(f"num_batches_tracked: expected counts >= 0, got {negative}")
  elif counts < 0:
    raise ValueError(f"num_batches_tracked: expected >= 0, got {counts}")
  variables = _as_variables(variables)
  flat = {c: _flatten(t) for c, t in variables.items()}
  out = {}
  for key, (c, path, layout) in torch_key_map(variables).items():
    out[key] = np.array(_to_torch_layout(_to_numpy(flat[c][path]), layout))  # own, writable
    if c == "batch_stats" and key.endswith(".running_var"):
      tracked = _tracked_key(key)
      out[tracked] = np.array(counts[tracked] if isinstance(counts, Mapping) else counts,
                              np.int64)
  return out


def _without_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """``state_dict`` without a ``module.`` (DataParallel) prefix on every key."""
  keys = list(state_dict)
  strip = bool(keys) and all(k.startswith("module.") for k in keys)
  return {(k[len("module."):] if strip else k): v for k, v in state_dict.items()}


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Numpy copy without ``num_batches_tracked`` and a ``module.`` (DataParallel) prefix."""
  return {k: _to_numpy(v) for k, v in _without_module_prefix(state_dict).items()
          if not k.endswith(_IGNORED_SUFFIXES)}


def num_batches_tracked_of(state_dict: Mapping[str, Any]) -> dict[str, int]:
  """Each BatchNorm's ``num_batches_tracked`` in a state dict (what ``normalize_state_dict``
  drops), by key without a ``module.`` prefix; ``{}`` for a state dict without them."""
  return {k: int(np.asarray(_to_numpy(v)).item())
          for k, v in _without_module_prefix(state_dict).items()
          if k.endswith(_IGNORED_SUFFIXES)}


def num_classes_of(state_dict: Mapping[str, Any]) -> int:
  """The number of classes of a state dict (rows of the visual classifier's last layer)."""
  if _NUM_CLASSES_KEY not in state_dict:
    raise KeyError(f"state dict has no {_NUM_CLASSES_KEY!r}, needed to infer num_classes; "
                   "pass model= or template= explicitly")
  return int(np.shape(state_dict[_NUM_CLASSES_KEY])[0])


def check_reference_model(model) -> None:
  """Raises a one-line ``ValueError`` unless ``model`` is ``DSF3N`` with the stock parts.

  Its settings may differ from the reference (kernel sizes, stages, the MFA
  variant, no MFA): the mapping follows the variable tree. Another model class
  or another fusion, head or classifier has no counterpart in the original.
  """
  from dsf3n_jax.models import DSF3N, registry

  if type(model) is not DSF3N:
    raise ValueError(f"convert: the model is a {type(model).__name__}, not DSF3N; only the "
                     "original architecture has PyTorch weights")
  for field in dataclasses.fields(DSF3N):
    value = getattr(model, field.name)
    if field.name in registry.PARTS and value != field.default and value is not (
        registry.lookup(field.name, field.default)):  # the stock class itself is stock
      if not isinstance(value, str):
        value = getattr(getattr(value, "func", value), "__qualname__", value)
      raise ValueError(f"convert: model.{field.name}={value!r} has no counterpart in the "
                       f"original PyTorch model; only {field.name} {field.default!r} converts")
  if model.missing_partner in ("learned", "mean"):
    raise ValueError(f"convert: model.missing_partner={model.missing_partner!r} has variables "
                     "(its stand-in tokens) the original PyTorch model has no counterpart for; "
                     "only 'self' converts")


def variables_template(model) -> dict[str, Any]:
  """Shape structs of ``model``'s variables (no computation, no memory)."""
  import jax
  import jax.numpy as jnp

  visual = jax.ShapeDtypeStruct((1, model.visual_dim), jnp.float32)
  audio = jax.ShapeDtypeStruct((1, model.audio_dim), jnp.float32)
  return dict(jax.eval_shape(lambda v, a: model.init(jax.random.key(0), v, a), visual, audio))


def from_torch_state_dict(state_dict: Mapping[str, Any], *, model=None,
                          template: Mapping[str, Any] | None = None, strict: bool = True,
                          dtype: Any = None) -> dict[str, Any]:
  """The original's state dict as our ``{"params", "batch_stats"}``.

  Args:
    state_dict: torch key -> numpy array or torch tensor (``num_batches_tracked``
      entries and a ``module.`` prefix are ignored).
    model: the ``DSF3N`` the weights are for; default ``DSF3N(num_classes)``
      (the reference configuration) with ``num_classes`` read off the state dict.
      It must have the original's parts (``check_reference_model``).
    template: variables (or shape structs) to take the structure from instead
      of ``model``.
    strict: if True, keys the model does not have are an error; if False they
      are ignored with a warning naming them.
    dtype: cast every array to this dtype (default: keep each array's dtype).

  Returns:
    ``{"params": ..., "batch_stats": ...}`` of numpy arrays (``batch_stats``
    only when the template has it).

  Raises:
    ValueError: naming every missing, unexpected (strict) and mis-shaped key, every
      key with a non-finite value, or the part of ``model`` that is not the original's.
  """
  sd = normalize_state_dict(state_dict)
  if template is None:
    if model is None:
      from dsf3n_jax.models import DSF3N
      model = DSF3N(num_classes_of(sd))
    check_reference_model(model)
    template = variables_template(model)
  template = _as_variables(template)
  flat_template = {c: _flatten(t) for c, t in template.items()}
  key_map = torch_key_map(template)

  missing, misshaped, nonfinite = [], [], []
  flat_out: dict[str, dict[tuple[str, ...], np.ndarray]] = {c: {} for c in template}
  for key, (collection, path, layout) in key_map.items():
    if key not in sd:
      missing.append(key)
      continue
    leaf = flat_template[collection][path]
    expected = _to_torch_layout(np.empty(tuple(getattr(leaf, "shape", np.shape(leaf))), np.int8),
                                layout).shape
    value = sd[key]
    if value.shape != expected:
      misshaped.append(f"{key}: expected {expected}, got {value.shape}")
      continue
    value = _from_torch_layout(value, layout)
    if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
      nonfinite.append(f"{key} ({int(np.size(value) - np.isfinite(value).sum())} of "
                       f"{np.size(value)})")
    flat_out[collection][path] = np.array(value, dtype=dtype) if dtype else np.array(value)
  unexpected = [k for k in sd if k not in key_map]
  problems = []
  if missing:
    problems.append(f"missing keys {missing}")
  if unexpected and strict:
    problems.append(f"unexpected keys {unexpected} (strict=False, --no_strict in convert, "
                    "ignores them)")
  if misshaped:
    problems.append(f"mis-shaped keys [{'; '.join(misshaped)}]")
  if problems:
    raise ValueError("torch state dict does not match the model: " + "; ".join(problems))
  if nonfinite:
    raise ValueError(f"torch state dict has non-finite (NaN or Inf) values in {nonfinite}; "
                     "expected finite weights (a diverged or damaged checkpoint?)")
  if unexpected:
    warnings.warn(f"ignoring unexpected torch keys {unexpected}", stacklevel=2)
  return {c: _unflatten(flat) for c, flat in flat_out.items()}
