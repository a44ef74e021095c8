"""The mAP implementations ours is timed against: the original loop, numpy, scikit-learn.

``fx_calc_map_label`` transcribes the reference ``evaluate.fx_calc_map_label``
(scipy ``cdist``, ``argsort``, a Python double loop over queries and ranked
items accumulating ``r / (j + 1)``). ``numpy_map`` is the same computation
vectorised over items in blocks of queries; ``sklearn_map`` asks scikit-learn's
``label_ranking_average_precision_score``, which equals AP per query when
every query has a relevant item and distances have no ties.
"""

from __future__ import annotations

import numpy as np


def fx_calc_map_label(image, text, label, k: int = 0, dist_method: str = "COS") -> float:
  """The original metric, as written (queries ``image`` against items ``text``).

  Args:
    image: (n, d) queries.
    text: (n, d) items.
    label: (n,) labels, shared by queries and items (the original's signature).
    k: walk the first ``k`` ranked items (0: ``n`` of them, the original's default).
    dist_method: "COS" (cosine distance) or "L2".

  Returns:
    mAP, a float.
  """
  import scipy.spatial

  if dist_method == "L2":
    dist = scipy.spatial.distance.cdist(image, text, "euclidean")
  elif dist_method == "COS":
    dist = scipy.spatial.distance.cdist(image, text, "cosine")
  else:
    raise ValueError(f"dist_method: expected 'COS' or 'L2', got {dist_method!r}")
  ord_ = dist.argsort()
  numcases = dist.shape[0]
  if k == 0:
    k = numcases
  res = []
  for i in range(numcases):
    order = ord_[i]
    p = 0.0
    r = 0.0
    for j in range(k):
      if label[i] == label[order[j]]:
        r += 1
        p += r / (j + 1)
    if r > 0:
      res += [p / r]
    else:
      res += [0]
  return float(np.mean(res))


def _cosine_distances(queries: np.ndarray, items: np.ndarray) -> np.ndarray:
  q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
  x = items / np.maximum(np.linalg.norm(items, axis=1, keepdims=True), 1e-12)
  return 1.0 - q @ x.T


def numpy_map(queries, items, query_labels, item_labels, *, block_size: int = 512) -> float:
  """mAP over all ranked items, vectorised with numpy (float64, stable sort).

  Args:
    queries: (n, d) query embeddings.
    items: (m, d) item embeddings.
    query_labels: (n,) labels of the queries.
    item_labels: (m,) labels of the items.
    block_size: queries per block (memory ``O(block_size * m)``).

  Returns:
    mAP, a float.
  """
  queries = np.asarray(queries, np.float64)
  items = np.asarray(items, np.float64)
  query_labels = np.asarray(query_labels)
  item_labels = np.asarray(item_labels)
  positions = np.arange(1, items.shape[0] + 1, dtype=np.float64)
  ap = []
  for start in range(0, queries.shape[0], block_size):
    dist = _cosine_distances(queries[start:start + block_size], items)
    order = np.argsort(dist, axis=1, kind="stable")
    rel = item_labels[order] == query_labels[start:start + block_size, None]
    found = np.cumsum(rel, axis=1)
    hits = found[:, -1]
    ap.append(np.where(hits > 0, (rel * found / positions).sum(1) / np.maximum(hits, 1), 0.0))
  return float(np.concatenate(ap).mean())


def sklearn_map(queries, items, query_labels, item_labels) -> float:
  """mAP via ``sklearn.metrics.label_ranking_average_precision_score``.

  Args:
    queries, items, query_labels, item_labels: as in ``numpy_map``.

  Returns:
    mAP, a float (a query without relevant items counts 1 there, 0 in the original).
  """
  from sklearn.metrics import label_ranking_average_precision_score

  queries = np.asarray(queries, np.float64)
  items = np.asarray(items, np.float64)
  relevant = np.asarray(query_labels)[:, None] == np.asarray(item_labels)[None, :]
  return float(label_ranking_average_precision_score(relevant,
                                                     -_cosine_distances(queries, items)))


def synthetic_embeddings(n: int, *, dim: int = 64, num_classes: int = 10, noise: float = 1.5,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Paired embeddings around class centres, so rankings are neither trivial nor random.

  Args:
    n: number of pairs.
    dim: embedding size.
    num_classes: number of classes.
    noise: standard deviation of the per-item noise (centres have unit scale).
    seed: numpy seed.

  Returns:
    ``(visual (n, dim), audio (n, dim), labels (n,))``, float32 and int32.
  """
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((num_classes, dim))
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  visual = centres[labels] + noise * rng.standard_normal((n, dim))
  audio = centres[labels] + noise * rng.standard_normal((n, dim))
  return visual.astype(np.float32), audio.astype(np.float32), labels
