"""Comparison methods that run on paired features alone (the paper's Tables I-II).

Each ``fit_*`` takes the standardised ``train`` and ``test`` splits (dicts of
``visual``, ``audio``, ``label`` arrays) and returns ``(test visual embedding,
test audio embedding, details)``: every method embeds an item from its own
modality only (the "unimodal" protocol). The CCA family is closed-form numpy
in float64; deep CCA is JAX (optax); semantic matching is scikit-learn.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np

# Ridge of every CCA-family whitening (x each covariance's mean variance): keeps it finite on
# rank-deficient features (fsdd's visual rows are upsampled 8x8 images).
CCA_RIDGE = 1e-3


def _inverse_sqrt(cov: np.ndarray, ridge: float) -> np.ndarray:
  """``(cov + ridge * mean variance * I)^(-1/2)`` of a symmetric PSD matrix."""
  values, vectors = np.linalg.eigh(cov)
  values = np.clip(values, 0, None) + ridge * np.trace(cov) / len(cov)
  return vectors / np.sqrt(values)


def cca_from_moments(cxx: np.ndarray, cyy: np.ndarray, cxy: np.ndarray, k: int,
                     ridge: float = CCA_RIDGE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Ridge CCA from (centred) covariances: ``(proj_x (dx, k), proj_y (dy, k), correlations)``."""
  wx, wy = _inverse_sqrt(cxx, ridge), _inverse_sqrt(cyy, ridge)
  u, s, vt = np.linalg.svd(wx.T @ cxy @ wy)
  return wx @ u[:, :k], wy @ vt.T[:, :k], s[:k]


def _num_components(train: dict[str, np.ndarray], num_classes: int, *dims: int) -> int:
  return int(min(num_classes, *dims, len(train["label"])))


def _project(x, y, mean_x, mean_y, proj_x, proj_y):
  return (x - mean_x) @ proj_x, (y - mean_y) @ proj_y


def linear_cca(x, y, k: int, ridge: float = CCA_RIDGE):
  """Pairwise CCA of rows ``x[i] <-> y[i]``: ``(mean_x, proj_x, mean_y, proj_y, corr)``."""
  mx, my = x.mean(0), y.mean(0)
  xc, yc = x - mx, y - my
  n = len(x)
  px, py, corr = cca_from_moments(xc.T @ xc / n, yc.T @ yc / n, xc.T @ yc / n, k, ridge)
  return mx, px, my, py, corr


def fit_linear_cca(train, test, *, num_classes: int, **_):
  """Linear CCA on the train pairs; embeddings are the canonical variates."""
  x, y = train["visual"].astype(np.float64), train["audio"].astype(np.float64)
  k = _num_components(train, num_classes, x.shape[1], y.shape[1])
  mx, px, my, py, corr = linear_cca(x, y, k)
  v, a = _project(test["visual"], test["audio"], mx, my, px, py)
  return v, a, {"components": k, "train_correlations": corr.tolist()}


def fit_cluster_cca(train, test, *, num_classes: int, **_):
  """Cluster CCA (Rasiwasia et al., 2014): every visual-audio pair of one class corresponds.

  Closed form over the class sums: with ``n_c`` items of class ``c`` in each
  modality, ``C_xy = sum_c S_x,c S_y,c^T / P``, ``C_xx = sum_c n_c X_c^T X_c / P``
  (``P = sum_c n_c^2`` pairs), centred with the pair-weighted means.
  """
  x, y = train["visual"].astype(np.float64), train["audio"].astype(np.float64)
  labels = train["label"]
  classes, counts = np.unique(labels, return_counts=True)
  weight = counts[np.searchsorted(classes, labels)].astype(np.float64)  # n_c of each row
  pairs = float(np.sum(counts.astype(np.float64) ** 2))
  mx, my = (weight @ x) / pairs, (weight @ y) / pairs
  xc, yc = x - mx, y - my
  sums_x = np.stack([xc[labels == c].sum(0) for c in classes])
  sums_y = np.stack([yc[labels == c].sum(0) for c in classes])
  cxx = (xc * weight[:, None]).T @ xc / pairs
  cyy = (yc * weight[:, None]).T @ yc / pairs
  k = _num_components(train, num_classes, x.shape[1], y.shape[1])
  px, py, corr = cca_from_moments(cxx, cyy, sums_x.T @ sums_y / pairs, k)
  v, a = _project(test["visual"], test["audio"], mx, my, px, py)
  return v, a, {"components": k, "train_correlations": corr.tolist(), "class_pairs": pairs}


def _random_fourier(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.sqrt(2.0 / w.shape[1]) * np.cos(x @ w + b)


def _median_bandwidth(x: np.ndarray, rng: np.random.Generator, sample: int = 1000) -> float:
  rows = x[rng.choice(len(x), min(sample, len(x)), replace=False)]
  sq = np.sum(rows**2, 1)
  d2 = np.clip(sq[:, None] + sq[None] - 2 * rows @ rows.T, 0, None)
  return float(np.sqrt(np.median(d2[np.triu_indices(len(rows), 1)])))


def fit_kernel_cca(train, test, *, num_classes: int, seed: int, quick: bool = False, **_):
  """Kernel CCA with RBF kernels, approximated by random Fourier features (Rahimi & Recht).

  Each modality's features are mapped to ``D`` random Fourier features of an
  RBF kernel whose bandwidth is the median pairwise distance of 1,000 train
  rows; ridge linear CCA runs on those.
  """
  rng = np.random.default_rng(seed)
  features = 256 if quick else 2048
  maps = {}
  for modality in ("visual", "audio"):
    x = train[modality].astype(np.float64)
    sigma = _median_bandwidth(x, rng)
    maps[modality] = (rng.standard_normal((x.shape[1], features)) / sigma,
                      rng.uniform(0, 2 * np.pi, features), sigma)
  lift = {s: {m: _random_fourier(d[m].astype(np.float64), *maps[m][:2])
              for m in ("visual", "audio")} for s, d in (("train", train), ("test", test))}
  k = _num_components(train, num_classes, features)
  mx, px, my, py, corr = linear_cca(lift["train"]["visual"], lift["train"]["audio"], k)
  v, a = _project(lift["test"]["visual"], lift["test"]["audio"], mx, my, px, py)
  return v, a, {"components": k, "random_features": features,
                "bandwidths": {m: maps[m][2] for m in maps}, "train_correlations": corr.tolist()}


def _dcca_loss(params, x, y, *, apply, ridge: float):
  """Minus the total canonical correlation of the two networks' outputs (Andrew et al., 2013)."""
  import jax.numpy as jnp
  fx, fy = apply(params["visual"], x), apply(params["audio"], y)
  fx, fy = fx - fx.mean(0), fy - fy.mean(0)
  n, d = fx.shape

  def inv_sqrt(c):
    c = c + ridge * jnp.trace(c) / d * jnp.eye(d)
    values, vectors = jnp.linalg.eigh(c)
    return (vectors / jnp.sqrt(values)) @ vectors.T

  t = inv_sqrt(fx.T @ fx / n) @ (fx.T @ fy / n) @ inv_sqrt(fy.T @ fy / n)
  return -jnp.sum(jnp.sqrt(jnp.linalg.eigvalsh(t.T @ t) + 1e-9))


def fit_deep_cca(train, test, *, num_classes: int, seed: int, quick: bool = False, **_):
  """Deep CCA: one MLP per modality (2 x 256 ReLU, then ``num_classes`` outputs) trained
  full-batch with Adam to maximise the total correlation, then linear CCA on the outputs."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import linen as nn

  class Tower(nn.Module):
    out: int

    @nn.compact
    def __call__(self, x):
      for _ in range(2):
        x = nn.relu(nn.Dense(256)(x))
      return nn.Dense(self.out)(x)

  out, steps, lr = num_classes, (60 if quick else 400), 1e-3
  tower = Tower(out)
  x, y = jnp.asarray(train["visual"], jnp.float32), jnp.asarray(train["audio"], jnp.float32)
  kv, ka = jax.random.split(jax.random.key(seed))
  params = {"visual": tower.init(kv, x[:1]), "audio": tower.init(ka, y[:1])}
  tx = optax.adam(lr)
  loss_fn = functools.partial(_dcca_loss, apply=tower.apply, ridge=CCA_RIDGE)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
  embed = lambda m, d: np.asarray(tower.apply(params[m], jnp.asarray(d[m], jnp.float32)),
                                  np.float64)
  mx, px, my, py, corr = linear_cca(embed("visual", train), embed("audio", train), out)
  v, a = _project(embed("visual", test), embed("audio", test), mx, my, px, py)
  return v, a, {"components": out, "steps": steps, "lr": lr, "final_loss": float(loss),
                "train_correlations": corr.tolist(), "network": "Dense 256, ReLU, x2, Dense"}


def _semantic(train, test, make_classifier):
  probs, details = {}, {}
  for modality in ("visual", "audio"):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # not converging shows as n_iter == max_iter
      clf = make_classifier().fit(train[modality], train["label"])
    probs[modality] = clf.predict_proba(test[modality])
    details[modality] = {"n_iter": int(np.max(clf.n_iter_)), "max_iter": clf.max_iter,
                         "test_accuracy": float(np.mean(clf.classes_[probs[modality].argmax(1)]
                                                        == test["label"]))}
  return probs["visual"], probs["audio"], details


def semantic_kwargs(kind: str, *, seed: int, quick: bool) -> dict[str, Any]:
  if kind == "linear":  # lbfgs: multinomial
    return dict(C=1.0, max_iter=200 if quick else 1000, random_state=seed)
  return dict(hidden_layer_sizes=(256,), max_iter=50 if quick else 200, early_stopping=False,
              random_state=seed)


def fit_semantic(train, test, *, kind: str, seed: int, quick: bool = False, **_):
  """Semantic matching (Rasiwasia et al., 2010): one classifier per modality; the
  embeddings are the class-probability vectors. ``kind``: "linear" (logistic regression)
  or "mlp" (one hidden layer of 256)."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.neural_network import MLPClassifier
  cls = LogisticRegression if kind == "linear" else MLPClassifier
  kwargs = semantic_kwargs(kind, seed=seed, quick=quick)
  return _semantic(train, test, lambda: cls(**kwargs))
