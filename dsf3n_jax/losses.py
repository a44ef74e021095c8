"""DSF3N's training objective (SPEC "Losses"): ``L = L_id + alpha L_pair + beta L_center``.

Every term is a function of its own and ``dsf3n_loss`` combines them. Labels
may be integer class ids (batch,) or one-hot rows (batch, C). An optional
``mask`` (batch,) of 0/1 weights excludes padded examples.

In a data-parallel step, pass ``axis_name``: each term then returns a
per-device value whose *mean over the axis* is the loss of the global batch,
so that ``lax.pmean`` of per-device gradients is the global gradient. This
matters for the centre loss, whose per-class counts are over the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def _class_ids(labels: Array, num_classes: int) -> Array:
  """Integer ids from ids or one-hot rows."""
  if labels.ndim == 2:
    if labels.shape[-1] != num_classes:
      raise ValueError(f"labels: one-hot rows must have {num_classes} columns, got "
                       f"{labels.shape[-1]}")
    return jnp.argmax(labels, axis=-1)
  if labels.ndim != 1:
    raise ValueError(f"labels: expected shape (batch,) or (batch, C), got {labels.shape}")
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
  return n_dev * local / jnp.maximum(jax.lax.psum(total, axis_name), 1)


def cross_entropy(logits: Array, labels: Array, *, mask: Array | None = None,
                  axis_name: str | None = None) -> Array:
  """Softmax cross-entropy averaged over the batch (``nn.CrossEntropyLoss``)."""
  ids = _class_ids(labels, logits.shape[-1])
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
  onehot = jax.nn.one_hot(_class_ids(labels, num_classes), num_classes, dtype=logits_visual.dtype)
  w = _weights(mask, logits_visual.shape[0], logits_visual.dtype)

  def frobenius(logits):
    sq = jnp.sum(w * jnp.sum(jnp.square(logits - onehot), axis=-1))
    count = jnp.sum(w)
    if axis_name is not None:
      sq, count = jax.lax.psum(sq, axis_name), jax.lax.psum(count, axis_name)
    return jnp.sqrt(sq) / jnp.maximum(count, 1)

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
  ids = _class_ids(labels, num_classes)
  norm = _norm(features, keepdims=True)
  f_hat = features / jnp.maximum(norm, 1e-12)
  w = _weights(mask, features.shape[0], f_hat.dtype)
  counts = jnp.zeros((num_classes,), f_hat.dtype).at[ids].add(w)
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
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
  emb_v, emb_a, logits_v, logits_a = outputs
  kw = dict(mask=mask, axis_name=axis_name)
  parts = {
      "id": identity_loss(logits_v, logits_a, labels, form=id_form, **kw),
      "pair": pair_loss(emb_v, emb_a, **kw),
      "center": center_loss(emb_v, labels, centers, **kw) + center_loss(emb_a, labels, centers,
                                                                         **kw),
  }
  total = id_weight * parts["id"] + alpha * parts["pair"] + beta * parts["center"]
  return total, parts
