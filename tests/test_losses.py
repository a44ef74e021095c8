"""dsf3n_jax.losses against the PyTorch losses of the baseline and hand computations."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsf3n_jax import losses

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tdsf3n():
  pytest.importorskip("torch")
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  from benchmarks import torch_dsf3n
  return torch_dsf3n


def _batch(seed=0, b=7, c=4, d=6):
  rng = np.random.RandomState(seed)
  return (rng.randn(b, d), rng.randn(b, d), rng.randn(b, c), rng.randn(b, c),
          np.array([0, 2, 2, 1, 0, 2, 1])[:b], rng.randn(c, d))


def test_center_loss_by_hand():
  f = np.array([[3.0, 4.0], [6.0, 8.0], [0.0, 2.0]])
  labels = np.array([0, 0, 1])
  centers = np.array([[0.5, 0.5], [0.0, 0.0]])
  f_hat = np.array([[0.6, 0.8], [0.6, 0.8], [0.0, 1.0]])
  expected = 0.5 * (2 * np.sum((f_hat[0] - centers[0]) ** 2) / 2 + 1.0)
  got = losses.center_loss(jnp.array(f), labels, jnp.array(centers))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  onehot = np.eye(2)[labels]
  np.testing.assert_allclose(losses.center_loss(jnp.array(f), onehot, jnp.array(centers)),
                             expected, rtol=1e-6)


def test_pair_loss_is_mean_euclidean_distance():
  a = np.array([[0.0, 0.0], [1.0, 1.0]])
  b = np.array([[3.0, 4.0], [1.0, 1.0]])
  np.testing.assert_allclose(losses.pair_loss(jnp.array(a), jnp.array(b)), 2.5, rtol=1e-6)


def test_losses_and_gradients_match_torch(tdsf3n):
  import torch

  emb_v, emb_a, logits_v, logits_a, labels, centers = _batch()
  alpha, beta = 0.3, 0.7
  with jax.enable_x64(True):
    def total(outputs, c):
      return losses.dsf3n_loss(outputs, labels, c, alpha=alpha, beta=beta)

    outs = tuple(jnp.asarray(x) for x in (emb_v, emb_a, logits_v, logits_a))
    (tot, parts), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
        outs, jnp.asarray(centers))
    tot, parts, grads = jax.device_get((tot, parts, grads))

  t_outs = [torch.tensor(x, requires_grad=True) for x in (emb_v, emb_a, logits_v, logits_a)]
  center = tdsf3n.CenterLoss(4, 6).double()
  with torch.no_grad():
    center.center.copy_(torch.from_numpy(centers))
  t_tot, t_parts = tdsf3n.total_loss(t_outs, torch.from_numpy(labels), center, alpha=alpha,
                                     beta=beta)
  t_tot.backward()
  np.testing.assert_allclose(tot, t_tot.item(), rtol=1e-12)
  for k in ("id", "pair", "center"):
    np.testing.assert_allclose(parts[k], t_parts[k].item(), rtol=1e-12, err_msg=k)
  for g, t in zip(grads[0], t_outs, strict=True):
    np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(grads[1], center.center.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_mask_excludes_examples():
  emb_v, emb_a, logits_v, logits_a, labels, centers = _batch()
  outs = tuple(jnp.asarray(x, jnp.float32) for x in (emb_v, emb_a, logits_v, logits_a))
  mask = np.array([1, 1, 1, 1, 1, 0, 0], np.float32)
  masked, _ = losses.dsf3n_loss(outs, labels, centers, alpha=0.1, beta=0.1, mask=mask)
  cut, _ = losses.dsf3n_loss(tuple(o[:5] for o in outs), labels[:5], centers, alpha=0.1,
                             beta=0.1)
  np.testing.assert_allclose(masked, cut, rtol=1e-6)


def test_class_ids_out_of_range_or_fractional_are_named_and_the_norm_has_no_nan_gradient():
  logits = jnp.zeros((4, 3))
  for labels, match in ((jnp.array([0, 1, 2, 3]), r"in \[0, 3\), got 3"),
                        (jnp.array([0, 1, 2, -1]), r"in \[0, 3\), got -1"),
                        (jnp.array([0.5, 1.0, 2.0, 0.0]), r"expected integer class ids "
                                                          r"\(or one-hot rows\), got 0.5")):
    with pytest.raises(ValueError, match=match):
      losses.identity_loss(logits, logits, labels)
    with pytest.raises(ValueError, match=match):
      losses.center_loss(jnp.ones((4, 2)), labels, jnp.zeros((3, 2)))
  # Whole-number float ids are ids; a row the mask leaves out (padding) may hold any id.
  floats = jnp.array([0.0, 1.0, 2.0, 0.0])
  assert float(losses.identity_loss(logits, logits, floats)) == float(
      losses.identity_loss(logits, logits, floats.astype(jnp.int32)))
  padded, mask = jnp.array([0, 1, 2, -1]), jnp.array([1.0, 1.0, 1.0, 0.0])
  assert np.isfinite(float(losses.identity_loss(logits, logits, padded, mask=mask)))
  assert np.isfinite(float(losses.center_loss(jnp.ones((4, 2)), padded, jnp.zeros((3, 2)),
                                              mask=mask)))
  # The paper's identity loss at its minimum (logits exactly one-hot): a zero gradient.
  labels = jnp.array([0, 1, 2, 0])
  onehot = jax.nn.one_hot(labels, 3)
  grad = jax.grad(lambda x: losses.identity_loss(x, x, labels, form="paper"))(onehot)
  assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) == 0.0
