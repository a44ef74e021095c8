"""DSF3N's training objective (the original's train_model.py): L_id + alpha L_pair + beta L_center.

Every term is a function of its own and ``dsf3n_loss`` combines them. Labels
may be integer class ids (batch,) or one-hot rows (batch, C). An optional
``mask`` (batch,) of 0/1 weights excludes padded examples.

Training combines *loss terms by name* (``config.loss.terms``, name -> weight;
``{"id": 1.0, "pair": 1e-4, "center": 5e-4}`` is the original's objective).
A user adds a term in their own file with ``register_loss_term``; a term may
own trainable auxiliary parameters (the centres; a temperature), which live in
``TrainState.aux[name]`` and get their own optimiser.

In a data-parallel step, pass ``axis_name``: each term then returns a
per-device value whose *mean over the axis* is the loss of the global batch,
so that ``lax.pmean`` of per-device gradients is the global gradient. This
matters for the centre loss, whose per-class counts are over the whole batch.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsf3n_jax.mesh import psum, single

Array = jax.Array


def _class_ids(labels: Array, num_classes: int, mask: Array | None = None) -> Array:
  """Integer ids from ids or one-hot rows.

  Concrete ids (outside jit) are checked: a fractional id, or one outside ``[0, C)`` where
  ``mask`` (if given) counts the row, is an error naming it, not a NaN or a silent wrap.
  """
  if labels.ndim == 2:
    if labels.shape[-1] != num_classes:
      raise ValueError(f"labels: one-hot rows must have {num_classes} columns, got "
                       f"{labels.shape[-1]}")
    return jnp.argmax(labels, axis=-1)
  if labels.ndim != 1:
    raise ValueError(f"labels: expected shape (batch,) or (batch, C), got {labels.shape}")
  if not isinstance(labels, jax.core.Tracer) and (
      mask is None or not isinstance(mask, jax.core.Tracer)):
    values = np.asarray(labels)
    counted = np.ones(values.shape, bool) if mask is None else np.asarray(mask) != 0
    fractional = counted & (values != np.round(values))
    if fractional.any():
      raise ValueError(f"labels: expected integer class ids (or one-hot rows), got "
                       f"{values[fractional][0].item()!r}")
    bad = counted & ((values < 0) | (values >= num_classes))
    if bad.any():
      raise ValueError(f"labels: class ids must be in [0, {num_classes}), got "
                       f"{values[bad][0].item()!r}")
  return labels.astype(jnp.int32)


def _weights(mask: Array | None, batch: int, dtype) -> Array:
  return jnp.ones((batch,), dtype) if mask is None else mask.astype(dtype)


def _norm(x: Array, *, keepdims: bool = False) -> Array:
  """Euclidean norm over the last axis whose gradient at 0 is 0, not NaN.

  The value is exact; only the derivative at exactly zero differs from a
  plain ``sqrt`` (whose 0 * inf would poison every parameter).
  """
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=keepdims)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _mean(values: Array, weights: Array, axis_name: str | None) -> Array:
  """Weighted mean over the local batch; with ``axis_name``, a share of the global mean.

  The global mean is sum(w v) / sum(w) over all devices. Each device returns
  n_dev * local_sum / global_count so that the mean over devices is exact even
  when masks leave shards with different counts.
  """
  total = jnp.sum(weights)
  local = jnp.sum(values * weights)
  if axis_name is None:
    return local / jnp.maximum(total, 1)
  n_dev = jax.lax.psum(1, axis_name)
  return n_dev * local / jnp.maximum(psum(total, axis_name), 1)


def cross_entropy(logits: Array, labels: Array, *, mask: Array | None = None,
                  axis_name: str | None = None) -> Array:
  """Softmax cross-entropy averaged over the batch (``nn.CrossEntropyLoss``)."""
  ids = _class_ids(labels, logits.shape[-1], mask)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids)
  return _mean(ce, _weights(mask, logits.shape[0], ce.dtype), axis_name)


def identity_loss(logits_visual: Array, logits_audio: Array, labels: Array, *,
                  form: Literal["ce", "paper"] = "ce", mask: Array | None = None,
                  axis_name: str | None = None) -> Array:
  """The discriminative (label-space) loss ``L_id`` of both modalities.

  Args:
    logits_visual, logits_audio: (batch, C) classifier outputs.
    labels: (batch,) ids or (batch, C) one-hot rows.
    form: "ce" (the code: CE(v) + CE(a)) or "paper" (Eq. 6 as printed: the
      norm of prediction minus one-hot, ``||P - Y||_F / n`` per modality, on
      the linear predictions, summed over the two modalities).
    mask: optional (batch,) weights.
    axis_name: mapped axis for a data-parallel step.

  Returns:
    A scalar.
  """
  if form == "ce":
    return (cross_entropy(logits_visual, labels, mask=mask, axis_name=axis_name)
            + cross_entropy(logits_audio, labels, mask=mask, axis_name=axis_name))
  if form != "paper":
    raise ValueError(f"form: expected 'ce' or 'paper', got {form!r}")
  num_classes = logits_visual.shape[-1]
  onehot = jax.nn.one_hot(_class_ids(labels, num_classes, mask), num_classes,
                          dtype=logits_visual.dtype)
  w = _weights(mask, logits_visual.shape[0], logits_visual.dtype)

  def frobenius(logits):
    sq = jnp.sum(w * jnp.sum(jnp.square(logits - onehot), axis=-1))
    count = jnp.sum(w)
    if axis_name is not None:
      sq, count = psum(sq, axis_name), psum(count, axis_name)
    # The norm's gradient at 0 (logits exactly one-hot, or every row masked) is 0, not NaN.
    root = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
    return root / jnp.maximum(count, 1)

  return frobenius(logits_visual) + frobenius(logits_audio)


def pair_loss(emb_visual: Array, emb_audio: Array, *, mask: Array | None = None,
              axis_name: str | None = None) -> Array:
  """``L_pair``: mean Euclidean (not squared) distance between paired embeddings."""
  dist = _norm(emb_visual - emb_audio)
  return _mean(dist, _weights(mask, dist.shape[0], dist.dtype), axis_name)


def center_loss(features: Array, labels: Array, centers: Array, *, mask: Array | None = None,
                axis_name: str | None = None) -> Array:
  """The centre loss of one modality (the paper's J_intra in the code's form).

  ``f_hat = f / max(||f||, 1e-12)``; ``1/2 sum_i ||f_hat_i - c_{y_i}||^2 / n_{y_i}``
  with ``n_k`` the number of (unmasked) batch items of class k: the per-class
  mean squared distance, summed over the classes present.

  Args:
    features: (batch, d) embeddings.
    labels: (batch,) ids or (batch, C) one-hot rows.
    centers: (C, d) class centres.
    mask: optional (batch,) weights.
    axis_name: mapped axis; class counts are then over the global batch.

  Returns:
    A scalar.
  """
  num_classes = centers.shape[0]
  ids = _class_ids(labels, num_classes, mask)
  norm = _norm(features, keepdims=True)
  f_hat = features / jnp.maximum(norm, 1e-12)
  w = _weights(mask, features.shape[0], f_hat.dtype)
  counts = jnp.zeros((num_classes,), f_hat.dtype).at[ids].add(w)
  if axis_name is not None:
    counts = psum(counts, axis_name)
  dist = jnp.sum(jnp.square(f_hat - centers[ids].astype(f_hat.dtype)), axis=-1)
  local = 0.5 * jnp.sum(w * dist / jnp.maximum(counts[ids], 1))
  if axis_name is not None:
    local = local * jax.lax.psum(1, axis_name)
  return local


def dsf3n_loss(outputs, labels: Array, centers: Array, *, alpha: float, beta: float,
               id_form: Literal["ce", "paper"] = "ce", id_weight: float = 1.0,
               mask: Array | None = None,
               axis_name: str | None = None) -> tuple[Array, Mapping[str, Array]]:
  """``L = L_id + alpha L_pair + beta L_center`` (reference ``train_model.py``).

  Args:
    outputs: ``(emb_visual, emb_audio, logits_visual, logits_audio)``, e.g. a
      ``DSF3NOutput``.
    labels: (batch,) ids or (batch, C) one-hot rows.
    centers: (C, embed_dim) class centres, shared by both modalities.
    alpha: weight of the pair loss.
    beta: weight of the centre loss.
    id_form: "ce" (reference) or "paper" (Eq. 6).
    id_weight: weight of the identity (discriminative) loss; 0 is the paper's
      ablation without J_dis. The parts are reported unweighted.
    mask: optional (batch,) weights (padded evaluation batches).
    axis_name: mapped axis for a data-parallel step.

  Returns:
    ``(total, {"id": ..., "pair": ..., "center": ...})``.
  """
  loss = make_loss({"id": id_weight, "pair": alpha, "center": beta},
                   options={"id": {"form": id_form}})
  return loss(outputs, {"label": labels, "mask": mask}, {"center": centers},
              axis_name=axis_name)


# -- loss terms by name --------------------------------------------------------------------

LossFn = Callable[..., tuple[Array, Mapping[str, Array]]]


@dataclasses.dataclass
class LossTerm:
  """A named term of the training loss (``register_loss_term`` makes one).

  Attributes:
    fn: ``fn(outputs, batch, params, *, axis_name=None, **options) -> scalar``.
      ``outputs`` is a ``DSF3NOutput`` (``emb_visual``, ``emb_audio``,
      ``logits_visual``, ``logits_audio``; at least float32); ``batch`` has ``"label"``
      ((batch,) ids) and ``"mask"`` ((batch,) 0/1 weights, or None);
      ``params`` is the term's auxiliary parameters (None without ``init``).
      With ``axis_name`` (a data-parallel step, one shard per device) it
      returns this device's share: the mean over the axis is the term over the
      global batch (``global_mean`` and ``all_gather`` help); without, the term
      over the batch given.
    init: ``init(key, *, num_classes, embed_dim, dtype) -> pytree``, the
      term's trainable auxiliary parameters, or None.
    optimizer: ``optimizer(config) -> optax.GradientTransformation`` for those
      parameters; None: the network's optimiser (same rule and schedule).
    options: ``options(loss_config) -> dict`` of keyword arguments of ``fn``
      taken from ``config.loss`` (e.g. ``"id"``'s ``form``), or None.
    teacher: whether ``fn`` reads ``batch["teacher"]``: in the unimodal loss, the
      paired outputs of the same items as each modality would have them without
      partner dropout (``DSF3N.__call__(..., teacher=True)``); the training step only
      computes them when a term of the unimodal loss asks.
  """

  fn: Callable[..., Array]
  init: Callable[..., Any] | None = None
  optimizer: Callable[..., Any] | None = None
  options: Callable[[Mapping[str, Any]], dict] | None = None
  teacher: bool = False

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)


def register_loss_term(name: str, *, init=None, optimizer=None, options=None,
                       teacher: bool = False):
  """Decorator registering ``fn`` as the loss term ``name`` (``config.loss.terms.<name>``).

  See ``LossTerm`` for the signatures. Returns ``fn`` unchanged.
  """
  from dsf3n_jax import registry  # pylint: disable=g-import-not-at-top

  def decorator(fn):
    term = LossTerm(fn, init=init, optimizer=optimizer, options=options, teacher=teacher)
    functools.update_wrapper(term, fn)  # its origin, for re-registration of a reloaded module
    registry.register("loss_term", name)(term)
    return fn

  return decorator


def lookup_term(name: str, *, where: str = "config.loss.terms") -> LossTerm:
  """The registered term ``name`` (``"module:name"`` imports ``module`` first)."""
  from dsf3n_jax import registry  # pylint: disable=g-import-not-at-top
  return registry.lookup("loss_term", name, where=f"{where}.{name}")


def term_origins(names) -> dict[str, str]:
  """``{name: "module:name"}``: where each term is registered (``lookup_term`` imports it)."""
  # A name given as "module:name" is registered as "name".
  return {name: f"{lookup_term(name).__module__}:{name.split(':', 1)[-1]}" for name in names}


def import_terms(origins: Mapping[str, str]) -> None:
  """Registers the terms of ``term_origins`` that are not yet (imports their modules)."""
  for origin in origins.values():
    lookup_term(origin)


def global_mean(values: Array, mask: Array | None = None, *,
                axis_name: str | None = None) -> Array:
  """The (masked) mean of per-example ``values`` over the global batch, as a device's share."""
  return _mean(values, _weights(mask, values.shape[0], values.dtype), axis_name)


def all_gather(x: Array, axis_name: str | None) -> Array:
  """``x`` of every device, concatenated along the batch (``x`` itself without an axis).

  For terms over pairs of the global batch (a contrastive loss): compute the
  term on the gathered arrays, which every device then holds, and return it
  as is (each device's share is the whole value; the mean over devices is it).
  """
  return x if single(axis_name) else jax.lax.all_gather(x, axis_name, tiled=True)


@register_loss_term("id", options=lambda c: {"form": c.get("id_form", "ce")})
def _id_term(outputs, batch, params, *, axis_name=None, form="ce"):
  del params
  return identity_loss(outputs[2], outputs[3], batch["label"], form=form,
                       mask=batch.get("mask"), axis_name=axis_name)


@register_loss_term("pair")
def _pair_term(outputs, batch, params, *, axis_name=None):
  del params
  return pair_loss(outputs[0], outputs[1], mask=batch.get("mask"), axis_name=axis_name)


def _init_centers(key, *, num_classes: int, embed_dim: int, dtype) -> Array:
  return jax.random.normal(key, (num_classes, embed_dim), dtype)


@register_loss_term("center", init=_init_centers,
                    optimizer=lambda config: optax.sgd(config.optim.center_lr))
def _center_term(outputs, batch, centers, *, axis_name=None):
  kw = dict(mask=batch.get("mask"), axis_name=axis_name)
  return (center_loss(outputs[0], batch["label"], centers, **kw)
          + center_loss(outputs[1], batch["label"], centers, **kw))


def _unit(x: Array) -> Array:
  return x / jnp.maximum(_norm(x, keepdims=True), 1e-12)


def distill_loss(emb_visual: Array, emb_audio: Array, teacher_visual: Array,
                 teacher_audio: Array, labels: Array, *, num_classes: int,
                 target: Literal["pair", "class"] = "pair", mask: Array | None = None,
                 axis_name: str | None = None) -> Array:
  """Each modality's embedding alone pulled toward what the paired embeddings know.

  The teacher of pair i is ``t_i = unit(unit(p_v,i) + unit(p_a,i))``: the direction
  of its two paired embeddings (constants: no gradient flows into them), each with its
  real partner (the step's ``batch["teacher"]``: not the partner-dropped outputs).
  ``target="pair"``: both alone embeddings of pair i toward ``t_i``;
  ``"class"``: toward the unit mean of ``t`` over the (global) batch's items of the
  pair's class, the class centre in the paired space. The loss is the mean over
  the batch of ``(1 - cos(a_v, target)) + (1 - cos(a_a, target))``.
  """
  t = jax.lax.stop_gradient(_unit(_unit(teacher_visual) + _unit(teacher_audio)))
  weights = _weights(mask, t.shape[0], t.dtype)
  if target == "class":
    onehot = jax.nn.one_hot(_class_ids(labels, num_classes, mask), num_classes, dtype=t.dtype)
    sums = psum(jnp.einsum("bk,bd->kd", onehot * weights[:, None], t), axis_name)
    t = onehot @ jax.lax.stop_gradient(_unit(sums))
  elif target != "pair":
    raise ValueError(f"target: expected 'pair' or 'class', got {target!r}")
  cos = jnp.sum(_unit(emb_visual) * t, axis=-1) + jnp.sum(_unit(emb_audio) * t, axis=-1)
  return _mean(2.0 - cos, weights, axis_name)


def _distill_term(target):
  def term(outputs, batch, params, *, axis_name=None):
    """0 without a teacher (the paired loss); the unimodal loss's batch holds the paired
    outputs, each modality with its real partner, as ``"teacher"`` (``steps.train_step``)."""
    del params
    teacher = batch.get("teacher")
    if teacher is None:
      return jnp.zeros((), outputs[0].dtype)
    return distill_loss(outputs[0], outputs[1], teacher[0], teacher[1], batch["label"],
                        num_classes=outputs[2].shape[-1], target=target,
                        mask=batch.get("mask"), axis_name=axis_name)
  term.__name__ = term.__qualname__ = f"distill_{target}"
  return term


# The alone embeddings toward their pair's paired embedding, or toward its class centre in
# the paired space (weights in ``config.loss.unimodal_terms``; 0 in ``loss.terms``).
register_loss_term("distill_pair", teacher=True)(_distill_term("pair"))
register_loss_term("distill_class", teacher=True)(_distill_term("class"))


def uses_teacher(loss_config: Mapping[str, Any]) -> bool:
  """Whether a term of the unimodal loss of ``config.loss`` reads the teacher outputs."""
  if float(loss_config.get("unimodal_weight", 0.0)) <= 0:
    return False
  return any(lookup_term(name).teacher for name in term_weights(loss_config, unimodal=True))


def make_loss(weights: Mapping[str, float], *,
              options: Mapping[str, Mapping[str, Any]] | None = None) -> LossFn:
  """``loss(outputs, batch, aux, *, axis_name=None) -> (total, parts)`` of weighted terms.

  ``total`` is the weighted sum in the order of ``weights``; ``parts`` holds
  each term unweighted, by name. ``aux[name]`` are a term's parameters.
  """
  terms = {name: lookup_term(name) for name in weights}
  options = options or {}

  def loss(outputs, batch, aux, *, axis_name=None):
    parts = {name: term(outputs, batch, (aux or {}).get(name), axis_name=axis_name,
                        **options.get(name, {}))
             for name, term in terms.items()}
    total = sum(weights[name] * value for name, value in parts.items())
    return total, parts

  return loss


def term_weights(loss_config: Mapping[str, Any], *, unimodal: bool = False) -> dict[str, float]:
  """``config.loss.terms`` as ``{name: weight}`` (``unimodal``: with ``unimodal_terms`` set)."""
  weights = {k: float(v) for k, v in dict(loss_config["terms"]).items()}
  if unimodal:
    weights.update({k: float(v) for k, v in dict(loss_config.get("unimodal_terms", {})).items()})
  return weights


def loss_from_config(loss_config: Mapping[str, Any], *, unimodal: bool = False,
                     weights: Mapping[str, Any] | None = None) -> LossFn:
  """The loss ``config.loss`` describes (``unimodal``: its unimodal form).

  ``weights`` replace the config's weights of the same terms; they may be
  traced arrays (``steps.per_device_hyper_step``).
  """
  weights = weights if weights is not None else term_weights(loss_config, unimodal=unimodal)
  terms = {name: lookup_term(name) for name in weights}
  options = {name: term.options(loss_config) for name, term in terms.items()
             if term.options is not None}
  return make_loss(weights, options=options)


def init_aux(names, key: Array, *, num_classes: int, embed_dim: int, dtype) -> dict[str, Any]:
  """``{name: params}`` of the named terms that have parameters.

  The centre term's key is ``key`` itself (what runs have always used);
  another term's is ``key`` folded with a hash of its name.
  """
  aux = {}
  for name in names:
    term = lookup_term(name)
    if term.init is not None:
      term_key = key if name == "center" else jax.random.fold_in(key, zlib.crc32(name.encode()))
      aux[name] = term.init(term_key, num_classes=num_classes, embed_dim=embed_dim, dtype=dtype)
  return aux
