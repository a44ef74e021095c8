"""Retrieval metrics: mean average precision (the paper's mAP), precision@k, recall@k.

The definition is the original ``evaluate.fx_calc_map_label``: for each query,
rank *all* items of the other modality by ascending distance; walking the
ranked list, at each 1-based position ``j`` whose item has the query's label,
count ``r += 1`` and add ``r / j``; the query's AP is that sum divided by ``r``
(0 when no relevant item is found); mAP is the mean over queries. With a
cut-off ``k`` only the first ``k`` positions are walked and the sum is divided
by the relevant items found *within* those ``k`` positions (the original's
``k``; not the "divide by min(k, R)" convention of some libraries).

Differences from the original, all deliberate:
  * Ties are broken deterministically: equal distances are ranked by item
    index (a stable order). The original's ``argsort`` is a quicksort, so its
    tie order is unspecified.
  * Query and item labels may differ and ``n != m``; labels absent from the
    items give AP 0.
  * Distances are computed in float32 (``1 - cos`` or Euclidean); the original
    uses float64 ``scipy.spatial.distance.cdist``. Only pairs whose distances differ
    by about float32's resolution can rank differently: for cosine that is about 6e-8
    absolute (``1 - cos`` of a cosine near 1), so embeddings within ~1e-6 of parallel
    rank coarsely; Euclidean distances are computed on vectors less the first item, so
    an offset far from the origin costs no precision (and integer data stays exact). A
    zero vector has cosine distance 1 to everything (``cdist`` gives NaN).

How it is computed: queries are processed in blocks of ``block_size`` (memory
is ``O(block_size * m)``, never ``n * m``), optionally sharded over the
``"data"`` axis of a mesh. Each (query, item) distance is packed with the item
index into one int64 key, which makes the (distance, index) order a plain
integer order. Two exact strategies give identical rankings (the APs agree to
float64 rounding, ~1e-16):
  * ``"sort"``: sort all ``m`` keys of each query. Cheap on GPU/TPU; on CPU
    XLA's sort costs ~1 s for 5,621 x 5,621.
  * ``"count"``: AP needs the positions of the relevant items only. Sort the
    keys of the query's relevant items (its class: a tenth of the items on
    VEGAS), place every item among them (a 16-way comparison pass, then a
    branchless binary search) and histogram the result: the position of the
    r-th relevant item is r plus the number of other items placed before it.
``strategy="auto"`` is ``"count"`` on CPU (about 4x faster than "sort" there)
and ``"sort"`` on GPU/TPU. See the README for timings.
AP sums are accumulated in float64.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Literal, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dsf3n_jax import map_kernel
from dsf3n_jax.datasets import validation
from dsf3n_jax.map_kernel import Distance, pairwise_distances  # noqa: F401  (public here)
from dsf3n_jax.mesh import DATA_AXIS

Strategy = Literal["auto", "sort", "count"]



class QueryStats(NamedTuple):
  """Per-query ranking statistics, the ingredients of every metric here.

  Attributes:
    average_precision: (n,) AP over the first ``k`` positions (0 if none relevant).
    hits: (n,) number of relevant items among the first ``k`` positions.
    num_relevant: (n,) number of relevant items in the whole retrieval set.
    cutoff: the number of positions looked at, ``min(k, m)``.
  """

  average_precision: np.ndarray
  hits: np.ndarray
  num_relevant: np.ndarray
  cutoff: int


def _as_labels(labels, name: str, length: int) -> np.ndarray:
  """Checked class ids (``validation.labels_to_ids``) of ``length`` rows."""
  ids = validation.labels_to_ids(labels, source="labels", key=name).astype(np.int64)
  if ids.shape[0] != length:
    raise ValueError(f"{name}: expected {length} labels (one per row), got {ids.shape[0]}")
  return ids


def _default_strategy() -> str:
  return "count" if jax.default_backend() == "cpu" else "sort"


def ranking_stats(queries, items, query_labels, item_labels, *, distance: Distance = "cosine",
                  k: int | None = None, block_size: int = 256, strategy: Strategy = "auto",
                  mesh: Mesh | None = None) -> QueryStats:
  """Per-query AP@k, hits@k and relevant counts; the kernel behind every metric.

  Args:
    queries: (n, d) query embeddings.
    items: (m, d) retrieval-set embeddings.
    query_labels: (n,) integer class ids (or one-hot rows) of the queries.
    item_labels: (m,) class ids (or one-hot rows) of the items.
    distance: "cosine" or "euclidean".
    k: look at the first ``k`` ranked positions only (None or 0: all ``m``).
    block_size: queries per block; memory is ``O(block_size * m)``.
    strategy: "sort", "count" or "auto" (see the module docstring); all exact.
    mesh: optional mesh with a "data" axis; query blocks are split over it and
      items replicated. Results are identical to one device (with the same
      ``block_size``; another block size may compute the float32 dot products
      with another kernel, which can move near-ties by one place).

  Returns:
    ``QueryStats`` of numpy arrays.
  """
  queries, items, query_labels, item_labels, cutoff, strategy = _checked(
      queries, items, query_labels, item_labels, k=k, block_size=block_size, strategy=strategy)
  n = queries.shape[0]
  if n == 0:
    empty = np.zeros((0,), np.float64)
    return QueryStats(empty, empty, empty, cutoff)
  table, dense_query_labels, dense_item_labels, absent = _class_table(query_labels, item_labels)
  shards = 1 if mesh is None else mesh.shape[DATA_AXIS]
  # Not below knn's minimum when there are fewer queries: a one-row block compiles to a
  # matrix-vector product, which rounds one ulp off the batched one (near-ties move).
  block_size = min(block_size, max(-(-n // shards), map_kernel.MIN_QUERY_BLOCK))
  chunk = block_size * shards
  pad = -(-n // chunk) * chunk - n
  queries = np.pad(queries, ((0, pad), (0, 0)))
  dense_query_labels = np.pad(dense_query_labels, (0, pad), constant_values=absent)
  with jax.enable_x64(True):
    args = (queries, items, dense_query_labels, dense_item_labels, dense_query_labels, table)
    if mesh is not None:
      rows = jax.sharding.NamedSharding(mesh, P(DATA_AXIS))
      replicated = jax.sharding.NamedSharding(mesh, P())
      args = tuple(jax.device_put(x, s) for x, s in zip(
          args, (rows, replicated, rows, replicated, rows, replicated)))
    ap, hits, num_rel = map_kernel.ranking_stats_kernel(*args, distance=distance, strategy=strategy,
                                       cutoff=cutoff, block_size=block_size, mesh=mesh)
    ap, hits, num_rel = (np.asarray(jax.device_get(x))[:n] for x in (ap, hits, num_rel))
  return QueryStats(ap.astype(np.float64), hits.astype(np.int64), num_rel.astype(np.int64),
                    cutoff)


def _checked(queries, items, query_labels, item_labels, *, k, block_size, strategy):
  """The arguments of ``ranking_stats`` checked: arrays, labels, cutoff and strategy."""
  queries = np.asarray(queries, np.float32)
  items = np.asarray(items, np.float32)
  if queries.ndim != 2 or items.ndim != 2 or queries.shape[1] != items.shape[1]:
    raise ValueError(f"queries and items: expected (n, d) and (m, d) with the same d, got "
                     f"{queries.shape} and {items.shape}")
  for name, x in (("queries", queries), ("items", items)):
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
      raise ValueError(f"{name}: row {int(np.argmax(bad))} is not finite (rows with NaN or "
                       f"Inf: {int(bad.sum())}); expected finite embeddings")
  n, m = queries.shape[0], items.shape[0]
  if m == 0 or m >= 2**31:
    raise ValueError(f"items: expected 1 <= m < 2**31 rows, got {m}")
  query_labels = _as_labels(query_labels, "query_labels", n)
  item_labels = _as_labels(item_labels, "item_labels", m)
  cutoff = m if not k else int(k)
  if cutoff < 0:
    raise ValueError(f"k: expected None or a positive int, got {k}")
  if block_size < 1:
    raise ValueError(f"block_size: expected a positive int, got {block_size}")
  if strategy == "auto":
    strategy = _default_strategy()
  if strategy not in ("sort", "count"):
    raise ValueError(f"strategy: expected 'auto', 'sort' or 'count', got {strategy!r}")
  return queries, items, query_labels, item_labels, min(cutoff, m), strategy


def _class_table(query_labels: np.ndarray, item_labels: np.ndarray):
  """Dense class ids and the "count" strategy's class table.

  Returns ``(table, query_ids, item_ids, absent)``: row c of ``table`` lists
  the items of class c in index order, padded with -1, plus an all-padding row
  ``absent`` for query labels no item has (their dense id).
  """
  classes, item_classes = np.unique(item_labels, return_inverse=True)
  counts = np.bincount(item_classes, minlength=len(classes))
  table = np.full((len(classes) + 1, int(counts.max())), -1, np.int32)
  for c in range(len(classes)):
    members = np.flatnonzero(item_classes == c)
    table[c, :len(members)] = members
  pos = np.minimum(np.searchsorted(classes, query_labels), len(classes) - 1)
  query_classes = np.where(classes[pos] == query_labels, pos, len(classes)).astype(np.int32)
  return table, query_classes, item_classes.astype(np.int32), len(classes)


def average_precision(queries, items, query_labels, item_labels, **kwargs) -> np.ndarray:
  """Per-query average precision (AP@k with ``k``), for analysis.

  Args:
    queries, items, query_labels, item_labels: as in ``ranking_stats``.
    **kwargs: keyword options of ``ranking_stats`` (distance, k, block_size,
      strategy, mesh).

  Returns:
    (n,) float64 AP of each query; 0 for a query with no relevant item found.
  """
  return ranking_stats(queries, items, query_labels, item_labels, **kwargs).average_precision


def mean_average_precision(queries, items, query_labels, item_labels, **kwargs) -> float:
  """mAP (mAP@k with ``k``) exactly as the original ``fx_calc_map_label``.

  Args:
    queries, items, query_labels, item_labels: as in ``ranking_stats``.
    **kwargs: keyword options of ``ranking_stats`` (distance, k, block_size,
      strategy, mesh).

  Returns:
    The mean over queries of their AP, a Python float.
  """
  ap = average_precision(queries, items, query_labels, item_labels, **kwargs)
  return float(ap.mean()) if ap.size else 0.0


def precision_at_k(queries, items, query_labels, item_labels, *, k: int,
                   **kwargs) -> np.ndarray:
  """Per-query precision@k: relevant items among the first k, divided by min(k, m).

  Args:
    queries, items, query_labels, item_labels: as in ``ranking_stats``.
    k: the cut-off (positive).
    **kwargs: other options of ``ranking_stats``.

  Returns:
    (n,) float64 precision@k of each query.
  """
  if not k or k < 1:
    raise ValueError(f"k: expected a positive int, got {k}")
  stats = ranking_stats(queries, items, query_labels, item_labels, k=k, **kwargs)
  return stats.hits / stats.cutoff


def recall_at_k(queries, items, query_labels, item_labels, *, k: int, **kwargs) -> np.ndarray:
  """Per-query recall@k: relevant items among the first k over all relevant items.

  Args:
    queries, items, query_labels, item_labels: as in ``ranking_stats``.
    k: the cut-off (positive).
    **kwargs: other options of ``ranking_stats``.

  Returns:
    (n,) float64 recall@k of each query; 0 for a query with no relevant item.
  """
  if not k or k < 1:
    raise ValueError(f"k: expected a positive int, got {k}")
  stats = ranking_stats(queries, items, query_labels, item_labels, k=k, **kwargs)
  return stats.hits / np.maximum(stats.num_relevant, 1)


def cross_modal_map(emb_visual, emb_audio, labels, *, distance: Distance = "cosine",
                    k: int | None = None, **kwargs) -> Mapping[str, float]:
  """The paper's numbers: mAP audio->visual, visual->audio and their average.

  Items are pairs, so one label vector serves both sides; each query is ranked
  against all items of the other modality (its own pair included).

  Args:
    emb_visual: (n, d) visual embeddings.
    emb_audio: (n, d) audio embeddings, row i paired with visual row i.
    labels: (n,) class ids (or one-hot rows).
    distance: "cosine" (the paper) or "euclidean".
    k: mAP@k cut-off (None: all items, the paper's protocol).
    **kwargs: other options of ``ranking_stats`` (block_size, strategy, mesh).

  Returns:
    {"audio_to_visual": float, "visual_to_audio": float, "average": float}.
  """
  a2v = mean_average_precision(emb_audio, emb_visual, labels, labels, distance=distance, k=k,
                               **kwargs)
  v2a = mean_average_precision(emb_visual, emb_audio, labels, labels, distance=distance, k=k,
                               **kwargs)
  return {"audio_to_visual": a2v, "visual_to_audio": v2a, "average": (a2v + v2a) / 2}


def original_protocol_count(num_examples: int, batch_size: int) -> int:
  """How many items of a split the original's evaluation sees.

  The original (``train_model.py``, ``eval_model``) reads the test split
  through ``DataLoader(batch_size=test_size, drop_last=True)`` without a
  ``shuffle`` argument, i.e. in file order, and computes the mAP on the
  concatenated batches only: the leading ``num_examples // test_size *
  test_size`` items, the last partial batch left out (``test_size`` is 128
  for VEGAS, 189 for AVE). Evaluating ``items[:count]`` reproduces its item
  set; ours evaluates every item by default.

  Args:
    num_examples: items in the split (>= 0).
    batch_size: the original's ``test_size`` (>= 0); 0 means no batching,
      every item (``config.metric.original_test_batches = 0``).

  Returns:
    The number of leading items evaluated; 0 when ``batch_size >
    num_examples`` (the original then has no batch at all and fails).

  Raises:
    ValueError: if either argument is negative.
  """
  num_examples, batch_size = operator.index(num_examples), operator.index(batch_size)
  if num_examples < 0:
    raise ValueError(f"num_examples: expected >= 0, got {num_examples}")
  if batch_size < 0:
    raise ValueError(f"batch_size: expected >= 0 (0 = every item), got {batch_size}")
  if batch_size == 0:
    return num_examples
  return num_examples // batch_size * batch_size
