"""Tests of dsf3n_jax.metrics against a transcription of the original mAP loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial
from sklearn.metrics import average_precision_score

from dsf3n_jax import map_kernel, metrics


def original_map(dist, query_labels, item_labels, k=0, per_query=False):
  """fx_calc_map_label, loop and all, with stable ties and separate labels."""
  order = np.argsort(dist, axis=1, kind="stable")
  n, m = dist.shape
  k = m if k == 0 else min(k, m)
  res = []
  for i in range(n):
    p = 0.0
    r = 0.0
    for j in range(k):
      if query_labels[i] == item_labels[order[i, j]]:
        r += 1
        p += r / (j + 1)
    res.append(p / r if r > 0 else 0.0)
  return np.array(res) if per_query else np.mean(res)


def _data(seed, n, m, d=8, classes=4, ties=False, absent=0):
  rng = np.random.default_rng(seed)
  if ties:  # few distinct small-integer vectors: many exactly equal distances
    q = rng.integers(-1, 2, (n, d)).astype(np.float32)
    x = rng.integers(-1, 2, (m, d)).astype(np.float32)
  else:
    q = rng.normal(size=(n, d)).astype(np.float32)
    x = rng.normal(size=(m, d)).astype(np.float32)
  ql = rng.integers(0, classes + absent, n)
  il = rng.integers(0, classes, m)
  return q, x, ql, il


def _ref(q, x, ql, il, k=0, distance="cosine", per_query=False):
  dist = np.asarray(metrics.pairwise_distances(q, x, distance=distance), np.float64)
  return original_map(dist, ql, il, k, per_query)


CASES = [  # (n, m, classes, k, ties, absent)
    (37, 53, 4, 0, False, 0),    # n != m, block size not dividing n
    (20, 20, 1, 0, False, 0),    # one class
    (30, 25, 3, 0, False, 2),    # query labels absent from the items
    (41, 60, 5, 0, True, 0),     # many exact ties
    (41, 60, 5, 3, True, 0),     # k below the number of relevant items
    (33, 40, 6, 30, False, 0),   # k above the number of relevant items
    (15, 12, 3, 100, True, 1),   # k above m
]


@pytest.mark.parametrize("strategy", ["sort", "count"])
@pytest.mark.parametrize("n,m,classes,k,ties,absent", CASES)
def test_equals_original_definition(n, m, classes, k, ties, absent, strategy):
  q, x, ql, il = _data(n * m + k, n, m, classes=classes, ties=ties, absent=absent)
  want = _ref(q, x, ql, il, k, per_query=True)
  got = metrics.average_precision(q, x, ql, il, k=k, block_size=8, strategy=strategy)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  assert abs(metrics.mean_average_precision(q, x, ql, il, k=k, block_size=8,
                                            strategy=strategy) - want.mean()) < 1e-6


def test_class_with_one_member_and_euclidean():
  q, x, ql, il = _data(3, 29, 31, classes=5)
  il[:] = np.where(il == 4, 3, il)
  il[7] = 4  # class 4 has exactly one item
  for strategy in ("sort", "count"):
    got = metrics.average_precision(q, x, ql, il, distance="euclidean", strategy=strategy,
                                    block_size=5)
    np.testing.assert_allclose(got, _ref(q, x, ql, il, distance="euclidean", per_query=True),
                               atol=1e-6, rtol=0)


def test_ties_are_broken_by_item_index():
  q = np.ones((1, 4), np.float32)
  x = np.ones((4, 4), np.float32)  # all items at distance 0
  # Stable by index: relevant items at positions 2 and 4 -> AP = (1/2 + 2/4) / 2.
  for strategy in ("sort", "count"):
    ap = metrics.average_precision(q, x, [1], [0, 1, 0, 1], strategy=strategy)
    np.testing.assert_allclose(ap, [0.5])


def test_ties_of_the_public_distances_are_ties_of_the_metric():
  # One query: the two items are bitwise tied by pairwise_distances, as by the metric's
  # blocks (a one-row product used to round one of them an ulp apart).
  q, x = np.array([[2.0, 2.0, -2.0]], np.float32), np.array([[0, 0, -2], [2, -1, -2]], np.float32)
  dist = np.asarray(metrics.pairwise_distances(q, x))
  assert dist[0, 0] == dist[0, 1]
  for strategy in ("sort", "count"):
    np.testing.assert_array_equal(metrics.average_precision(q, x, [0], [1, 0],
                                                            strategy=strategy), [0.5])
  # Euclidean, integer data: items 0 and 3 both at sqrt(30), exactly; by index, item 3 (the
  # relevant one) ranks after item 0.
  q = np.array([[-2, 2, 1, 3]], np.float32)
  x = np.array([[2, 3, -1, 0], [1, -2, 3, -3], [2, 1, -2, 2], [-1, 2, 3, -2], [0, -2, 1, 1],
                [2, 2, 3, 3]], np.float32)
  dist = np.asarray(metrics.pairwise_distances(q, x, distance="euclidean"))
  assert dist[0, 0] == dist[0, 3] == np.float32(np.sqrt(30))
  for strategy in ("sort", "count"):
    np.testing.assert_allclose(metrics.average_precision(
        q, x, [1], [0, 0, 0, 1, 0, 0], distance="euclidean", strategy=strategy), [0.2])


def test_euclidean_distances_keep_their_precision_far_from_the_origin():
  # Norms ~ 240, distances ~ 0.2: the expanded square of uncentred vectors keeps a few bits.
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 200)
  centre, protos = rng.normal(size=64) * 30, rng.normal(size=(10, 64)) * 0.004
  a, v = ((centre + protos[labels] + rng.normal(size=(200, 64)) * 0.02).astype(np.float32)
          for _ in range(2))
  want = scipy.spatial.distance.cdist(a.astype(np.float64), v.astype(np.float64))
  got = np.asarray(metrics.pairwise_distances(a, v, distance="euclidean"), np.float64)
  assert np.max(np.abs(got - want) / want) < 1e-6
  np.testing.assert_allclose(
      metrics.average_precision(a, v, labels, labels, distance="euclidean"),
      _ref(a.astype(np.float64), v.astype(np.float64), labels, labels, distance="euclidean",
           per_query=True), atol=0.02)


def test_distances_match_scipy():
  q, x, _, _ = _data(4, 17, 23, d=16)
  for ours, theirs in (("cosine", "cosine"), ("euclidean", "euclidean")):
    got = np.asarray(metrics.pairwise_distances(q, x, distance=ours))
    np.testing.assert_allclose(got, scipy.spatial.distance.cdist(q, x, theirs), atol=2e-6)


def test_matches_original_with_scipy_distances_and_quicksort():
  # The original exactly as written (float64 cdist, quicksort): continuous data has no ties.
  q, x, ql, il = _data(5, 64, 64, d=16, classes=4)
  dist = scipy.spatial.distance.cdist(q, x, "cosine")
  order = dist.argsort()
  res = []
  for i in range(len(q)):
    p = r = 0.0
    for j in range(len(x)):
      if ql[i] == il[order[i, j]]:
        r += 1
        p += r / (j + 1)
    res.append(p / r if r > 0 else 0)
  assert abs(metrics.mean_average_precision(q, x, ql, il) - np.mean(res)) < 1e-6


def test_equals_sklearn_average_precision():
  # Without ties and with every relevant item ranked (k=None), AP is sklearn's.
  q, x, ql, il = _data(6, 25, 40, classes=3)
  ap = metrics.average_precision(q, x, ql, il)
  dist = np.asarray(metrics.pairwise_distances(q, x), np.float64)
  for i in range(len(q)):
    y = il == ql[i]
    if y.any():
      assert abs(ap[i] - average_precision_score(y, -dist[i])) < 1e-6


@pytest.mark.parametrize("strategy", ["sort", "count"])
def test_block_size_and_devices_do_not_change_results(strategy):
  q, x, ql, il = _data(7, 45, 50, classes=4, ties=True)
  ap = lambda **kw: metrics.average_precision(q, x, ql, il, strategy=strategy, **kw)
  base = ap(block_size=4)
  for bs in (2, 7, 45, 1000):
    np.testing.assert_array_equal(ap(block_size=bs), base)
  # One query per block: XLA may round the float64 AP sum differently (1 ulp at most).
  np.testing.assert_allclose(ap(block_size=1), base, rtol=1e-15, atol=0)
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",))
  for bs in (2, 3, 16):
    np.testing.assert_array_equal(ap(block_size=bs, mesh=mesh), base)
  mesh1 = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  np.testing.assert_array_equal(ap(block_size=4, mesh=mesh1), base)
  np.testing.assert_allclose(base, _ref(q, x, ql, il, per_query=True), atol=1e-6, rtol=0)


def test_precision_and_recall_at_k():
  q, x, ql, il = _data(8, 19, 30, classes=3, absent=1)
  dist = np.asarray(metrics.pairwise_distances(q, x), np.float64)
  order = np.argsort(dist, axis=1, kind="stable")
  rel = il[order] == ql[:, None]
  for k in (1, 5, 30, 50):
    hits = rel[:, :k].sum(1)
    for strategy in ("sort", "count"):
      np.testing.assert_allclose(
          metrics.precision_at_k(q, x, ql, il, k=k, strategy=strategy), hits / min(k, 30))
      np.testing.assert_allclose(
          metrics.recall_at_k(q, x, ql, il, k=k, strategy=strategy),
          hits / np.maximum(rel.sum(1), 1))


def test_cross_modal_map_directions():
  rng = np.random.default_rng(9)
  labels = rng.integers(0, 4, 40)
  v = rng.normal(size=(40, 8)).astype(np.float32) + labels[:, None]
  a = rng.normal(size=(40, 8)).astype(np.float32) - labels[:, None]
  got = metrics.cross_modal_map(v, a, labels)
  assert abs(got["audio_to_visual"] - _ref(a, v, labels, labels)) < 1e-6
  assert abs(got["visual_to_audio"] - _ref(v, a, labels, labels)) < 1e-6
  assert got["average"] == pytest.approx((got["audio_to_visual"] + got["visual_to_audio"]) / 2)
  assert got["audio_to_visual"] != got["visual_to_audio"]
  onehot = np.eye(4)[labels]
  assert metrics.cross_modal_map(v, a, onehot) == got


def test_bad_inputs_name_the_argument():
  q, x, ql, il = _data(10, 5, 6)
  with pytest.raises(ValueError, match="query_labels"):
    metrics.mean_average_precision(q, x, ql[:3], il)
  with pytest.raises(ValueError, match="queries and items"):
    metrics.mean_average_precision(q, x[:, :3], ql, il)
  with pytest.raises(ValueError, match="distance"):
    metrics.mean_average_precision(q, x, ql, il, distance="manhattan")
  with pytest.raises(ValueError, match="strategy"):
    metrics.mean_average_precision(q, x, ql, il, strategy="fast")
  with pytest.raises(ValueError, match="k"):
    metrics.precision_at_k(q, x, ql, il, k=0)
  for name, at in (("items", 4), ("queries", 2)):  # a NaN is an error, not a score
    q_bad, x_bad = q.copy(), x.copy()
    {"items": x_bad, "queries": q_bad}[name][at, 1] = np.nan
    with pytest.raises(ValueError, match=rf"^{name}: row {at} is not finite"):
      metrics.mean_average_precision(q_bad, x_bad, ql, il)
  with pytest.raises(ValueError, match=r"^items: row 0 is not finite .*rows with NaN or Inf: 6"):
    metrics.cross_modal_map(np.full_like(x, np.nan), x[:, :8], il)


def test_real_data_raw_features(fsdd_path):
  with np.load(fsdd_path) as f:
    audio, labels = f["audio_test"][:120], f["lab_test"][:120]
  got = metrics.mean_average_precision(audio, audio, labels, labels)
  assert abs(got - _ref(audio, audio, labels, labels)) < 1e-6
  assert got > 0.1


@pytest.mark.parametrize("members", [1, 2, 3, 15, 16, 17, 40, 64])
def test_lower_bound_equals_searchsorted(members):
  """The count strategy's search, at table widths around every fan-out boundary."""
  rng = np.random.default_rng(members)
  keys = rng.integers(-50, 50, (6, 200)).astype(np.int64)  # below, among and above the rows
  rows = rng.integers(-40, 40, (6, members)).astype(np.int64)
  listed = np.broadcast_to(np.arange(members), (6, members))
  want = np.stack([np.searchsorted(np.sort(r), k, side="left") for r, k in zip(rows, keys)])
  with jax.enable_x64(True):
    table = np.asarray(map_kernel._sorted_members(rows, listed, map_kernel._INT64_MAX))
    assert table.shape[1] > members and np.all(table[:, members:] == map_kernel._INT64_MAX)
    np.testing.assert_array_equal(table[:, :members], np.sort(rows, axis=1))
    for fanout in (1, 2, 16):
      got = map_kernel._lower_bound(table, keys, fanout=fanout)
      np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("ulps", [-1, 1])
def test_count_places_no_relevant_item_against_its_own_key(monkeypatch, ulps):
  """XLA may compute a key twice, in the sorted members' fusion and in the placed items' one,
  and round the two differently (seen at --xla_backend_optimization_level=0: APs of inf). The
  members' keys are moved by an ulp of their distance here: the ranks stay exact."""
  q, x, ql, il = _data(7, 12, 40, classes=4)
  table, qc, ic, _ = metrics._class_table(ql, il)
  sorted_members = map_kernel._sorted_members
  monkeypatch.setattr(map_kernel, "_sorted_members", lambda keys, members, pad: sorted_members(
      keys + jnp.int64(ulps) * (1 << 32), members, pad))
  with jax.enable_x64(True):
    dist = metrics.pairwise_distances(q, x)
    ap, hits, num_relevant = map_kernel._block_stats_count(dist, qc, ic, table, 40)
  np.testing.assert_allclose(np.asarray(ap), _ref(q, x, ql, il, per_query=True), atol=1e-12)
  np.testing.assert_array_equal(np.asarray(hits), np.asarray(num_relevant))


def test_original_protocol_count():
  assert metrics.original_protocol_count(5621, 128) == 5504  # VEGAS's test_size
  assert metrics.original_protocol_count(256, 128) == 256
  assert metrics.original_protocol_count(1000, 189) == 945  # AVE's test_size
  assert metrics.original_protocol_count(100, 189) == 0
  assert metrics.original_protocol_count(0, 5) == 0
  assert metrics.original_protocol_count(1000, 0) == 1000  # 0: every item
  assert metrics.original_protocol_count(np.int64(10), np.int32(4)) == 8
  with pytest.raises(ValueError, match="batch_size: expected >= 0"):
    metrics.original_protocol_count(10, -1)
  with pytest.raises(ValueError, match="num_examples: expected >= 0"):
    metrics.original_protocol_count(-10, 4)
  with pytest.raises(TypeError):
    metrics.original_protocol_count(10, 2.5)


def test_original_protocol_count_is_what_a_drop_last_data_loader_yields():
  torch = pytest.importorskip("torch")
  for n, b in ((10, 4), (12, 4), (3, 4), (189 * 2 + 7, 189), (7, 1)):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(n)),
                                         batch_size=b, drop_last=True)  # as in the original
    seen = [int(i) for (batch,) in loader for i in batch]
    assert seen == list(range(metrics.original_protocol_count(n, b))), (n, b)
