"""The blocked, shardable ranking kernel behind ``dsf3n_jax.metrics`` (jnp, exact).

``ranking_stats`` there checks its arguments and calls ``ranking_stats_kernel``
here; the module docstring of ``metrics`` says how the two strategies work.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsf3n_jax.mesh import DATA_AXIS

Distance = Literal["cosine", "euclidean"]

_INT64_MAX = np.iinfo(np.int64).max
_EPS = 1e-12


# Queries per block at least (padded), in the metric and in search: XLA compiles a one-row
# product as a matrix-vector kernel, which rounds some distances one ulp off the batched one.
MIN_QUERY_BLOCK = 8


@functools.partial(jax.jit, static_argnames=("distance",))
def pairwise_distances(queries: jax.Array, items: jax.Array, *,
                       distance: Distance = "cosine") -> jax.Array:
  """Distances between every query and every item, in float32.

  Compiled, and with at least ``MIN_QUERY_BLOCK`` query rows (padded), as inside the metric's
  kernel, so that both round alike: two items at equal distances here are tied in the
  metric too, and ranked by index. Euclidean distances are computed from the queries and
  items less the first item (the distances are the same): ``|q|^2 + |x|^2 - 2 q.x`` of
  embeddings far from the origin, relative to their spread, would cancel to a few
  significant bits.

  Args:
    queries: (n, d) query embeddings.
    items: (m, d) item embeddings.
    distance: "cosine" (``1 - cos``, as ``cdist(..., 'cosine')``) or "euclidean".

  Returns:
    (n, m) float32 distances. Exact zeros are +0.0 (never -0.0).
  """
  q = jnp.asarray(queries, jnp.float32)
  x = jnp.asarray(items, jnp.float32)
  n = q.shape[0]
  if n < MIN_QUERY_BLOCK:  # as the metric's blocks: a one-row product rounds apart
    q = jnp.pad(q, ((0, MIN_QUERY_BLOCK - n), (0, 0)))
  if distance == "euclidean" and x.shape[0]:
    # Centred on an item: integer data stays integer (exact, so equal distances stay equal).
    q, x = q - x[0], x - x[0]
  # The raw dot product is scaled afterwards, elementwise: exact dot products for small
  # integer data (the norms round; a block of one query can round them apart, so blocks
  # have MIN_QUERY_BLOCK rows at least).
  dots = jnp.matmul(q, x.T, precision=jax.lax.Precision.HIGHEST)
  if distance == "cosine":
    qn = jnp.maximum(jnp.linalg.norm(q, axis=-1), _EPS)
    xn = jnp.maximum(jnp.linalg.norm(x, axis=-1), _EPS)
    dist = 1.0 - dots / qn[:, None] / xn[None, :]
  elif distance == "euclidean":
    sq = jnp.sum(q * q, -1)[:, None] + jnp.sum(x * x, -1)[None, :] - 2.0 * dots
    dist = jnp.sqrt(jnp.maximum(sq, 0.0))
  else:
    raise ValueError(f"distance: expected 'cosine' or 'euclidean', got {distance!r}")
  return jnp.where(dist == 0, jnp.float32(0), dist)[:n]


def ranking_keys(dist: jax.Array) -> jax.Array:
  """(b, m) float32 distances -> int64 keys ordered by (distance, item index)."""
  bits = jax.lax.bitcast_convert_type(dist, jnp.int32)
  ordered = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)  # monotone in the float
  index = jnp.arange(dist.shape[-1], dtype=jnp.int64)
  return (ordered.astype(jnp.int64) << 32) + index


def _row_sum(x: jax.Array) -> jax.Array:
  """Sum over the last axis in a fixed pairwise order, so blocking never changes the bits."""
  width = 1 << max(0, (x.shape[-1] - 1).bit_length())
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
  while x.shape[-1] > 1:
    half = x.shape[-1] // 2
    x = x[..., :half] + x[..., half:]
  return x[..., 0]


def _stats_from_sorted(rel_sorted: jax.Array, cutoff: int):
  """AP, hits and relevant counts from relevance flags in ranked order."""
  rel = rel_sorted.astype(jnp.float64)
  num_relevant = rel.sum(-1)
  rel = rel[:, :cutoff]
  found = jnp.cumsum(rel, axis=-1)
  positions = jnp.arange(1, cutoff + 1, dtype=jnp.float64)
  hits = found[:, -1]
  ap = _row_sum(rel * found / positions) / jnp.maximum(hits, 1.0)
  return ap, hits, num_relevant


def _block_stats_sort(dist, query_labels, item_labels, cutoff):
  keys = jax.lax.sort(ranking_keys(dist), dimension=1)
  order = (keys & jnp.int64(0xFFFFFFFF)).astype(jnp.int32)
  rel_sorted = item_labels[order] == query_labels[:, None]
  return _stats_from_sorted(rel_sorted, cutoff)


def _lower_bound(table: jax.Array, keys: jax.Array, *, fanout: int = 16) -> jax.Array:
  """For each of ``keys`` (b, m), how many entries of its row of ``table`` are below it.

  ``table`` (b, p) is sorted along rows, ``p`` a power of two, and the last
  entry of every row is padding that no key exceeds. The first ``log2(fanout)``
  bits of the answer come from comparing every key with ``fanout - 1`` evenly
  spaced entries of its row (one fused pass, no gather); the rest from a
  branchless binary search, one gather pass per halving step. The steps run in a
  ``fori_loop``: unrolled, XLA fuses each step into the next and recomputes
  every earlier gather (7x slower on CPU).
  """
  p = table.shape[1]
  fanout = min(fanout, p)
  width = p // fanout
  pos = jnp.zeros(keys.shape, jnp.int32)
  for s in range(1, fanout):
    pos = pos + (table[:, s * width - 1, None] < keys).astype(jnp.int32)
  pos = pos * width

  def step(i, pos):
    candidate = pos + jnp.right_shift(jnp.int32(width), i + 1)
    probe = jnp.take_along_axis(table, candidate - 1, axis=1, mode="promise_in_bounds")
    return jnp.where(probe < keys, candidate, pos)

  return jax.lax.fori_loop(0, width.bit_length() - 1, step, pos)


def _sorted_members(keys: jax.Array, members: jax.Array, pad_value) -> jax.Array:
  """Row-wise sorted keys of the listed members (-1: padding), padded to a power of two."""
  picked = jnp.take_along_axis(keys, jnp.maximum(members, 0), axis=1)
  picked = jax.lax.sort(jnp.where(members >= 0, picked, pad_value), dimension=1)
  width = 1 << members.shape[1].bit_length()  # > the member count: one padding entry at least
  return jnp.pad(picked, ((0, 0), (0, width - members.shape[1])), constant_values=pad_value)


def _block_stats_count(dist, query_labels, item_labels, class_table, cutoff):
  """Ranks of the relevant items only: sort their keys, place every other item among them.

  The r-th relevant item (1-based) is ranked after the r - 1 relevant items before it and
  after every other item placed before it, so its position is ``r`` plus the number of other
  items with fewer than ``r`` relevant items before them. A relevant item is never placed
  against its own key: XLA may compute a key in two fusions (the sorted members' and the
  placed items'), and a rounding difference between the two would otherwise move an item
  against itself (a position of 0, an AP of inf).
  """
  members = class_table[query_labels]                           # (b, M), -1 = padding
  num_relevant = jnp.sum(members >= 0, axis=1)
  keys = ranking_keys(dist)
  # slot[l] = number of relevant items ranked before item l (keys are unique).
  slot = _lower_bound(_sorted_members(keys, members, _INT64_MAX), keys)
  other = (item_labels[None, :] != query_labels[:, None]).astype(jnp.int32)
  # hist[s] = other items with exactly s relevant items before them.
  big, rows = members.shape[1], dist.shape[0]
  flat = (jnp.arange(rows, dtype=jnp.int32)[:, None] * (big + 1) + slot).reshape(-1)
  hist = jnp.zeros((rows * (big + 1),), jnp.int32).at[flat].add(other.reshape(-1),
                                                               mode="promise_in_bounds")
  r = jnp.arange(1, big + 1, dtype=jnp.float64)
  positions = r + jnp.cumsum(hist.reshape(rows, big + 1), axis=1)[:, :big].astype(jnp.float64)
  valid = (r[None, :] <= num_relevant[:, None]) & (positions <= cutoff)
  hits = valid.sum(-1).astype(jnp.float64)
  ap = _row_sum(jnp.where(valid, r / positions, 0.0)) / jnp.maximum(hits, 1.0)
  return ap, hits, num_relevant.astype(jnp.float64)


@functools.partial(jax.jit, static_argnames=("distance", "strategy", "cutoff", "block_size",
                                             "mesh"))
def ranking_stats_kernel(queries, items, query_labels, item_labels, query_classes, class_table, *,
                   distance, strategy, cutoff, block_size, mesh):
  """Blocked, optionally sharded, per-query statistics. Shapes are padded already."""
  d = queries.shape[-1]

  def local(q, ql, qc, items, item_labels, class_table):
    def one_block(args):
      q, ql, qc = args
      dist = pairwise_distances(q, items, distance=distance)
      if strategy == "sort":
        return _block_stats_sort(dist, ql, item_labels, cutoff)
      return _block_stats_count(dist, qc, item_labels, class_table, cutoff)

    blocks = (q.reshape(-1, block_size, d), ql.reshape(-1, block_size),
              qc.reshape(-1, block_size))
    out = jax.lax.map(one_block, blocks)
    return tuple(o.reshape(-1) for o in out)

  args = (queries, query_labels, query_classes, items, item_labels, class_table)
  if mesh is None:
    return local(*args)
  row, rep = P(DATA_AXIS), P()
  return jax.shard_map(local, mesh=mesh, in_specs=(row, row, row, rep, rep, rep),
                       out_specs=(row, row, row), check_vma=False)(*args)
