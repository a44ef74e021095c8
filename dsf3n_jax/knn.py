"""Exact k-nearest-neighbour search of a library of embeddings, at the speed of a matmul.

The library is sharded over the mesh's ``data`` axis (contiguous rows: device
0 holds the lowest ids). On each device a ``lax.scan`` runs over blocks of
its rows: one matrix product of the queries with the block, the block's
top-k (``lax.top_k``), merged into a running top-k. The devices' top-k are
then gathered and merged once more. No (queries x library) matrix is ever
built, and no 64-bit key per item: ties are broken by the lower id because
``lax.top_k`` puts the lower position first among equal values and every
merge puts the lower ids first (the running top-k before the new block,
device 0 before device 1).

Distances are the metric's own formula (``map_kernel.pairwise_distances``:
cosine ``1 - q.x / |q| / |x|`` on the raw dot products) in float32; the library's norms
are computed once. Euclidean distances are expanded as ``|q|^2 + |x|^2 - 2 q.x`` of the
queries and the library less the library's first row, as the metric centres its items
(the distances are the same; uncentred, a library far from the origin relative to its
spread would cancel to a few significant bits). Each product is one (query
block x library block) matrix product, which XLA may round differently from
the metric's (queries x items) product by an ulp, so two items within an ulp
of each other can rank in the other order than the metric ranks them; the
mAP of the two orders agrees (``tests/test_search.py``). Matrix products run at
``precision`` (default "highest": float32 on GPU/TPU too, so results equal a
float32 brute force; "default" lets accelerators use faster, less exact
passes). ``approximate=True`` takes each block's top-k with
``jax.lax.approx_max_k`` (TPU-KNN: the accelerators' fast path; on CPU it is
exact).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsf3n_jax import map_kernel
from dsf3n_jax.mesh import DATA_AXIS as AXIS
from dsf3n_jax.mesh import make_mesh

Distance = Literal["cosine", "euclidean"]
DISTANCES = ("cosine", "euclidean")
_NO_ID = np.iinfo(np.int32).max


@jax.jit
def _norms(x):
  """Per row: the clipped norm (cosine) and the squared norm (euclidean), as the metric has."""
  return (jnp.maximum(jnp.linalg.norm(x, axis=-1), map_kernel._EPS),  # pylint: disable=protected-access
          jnp.sum(x * x, -1))


@dataclasses.dataclass(frozen=True)
class Library:
  """The library's rows on the mesh, ready to search (``Library.put``)."""

  items: jax.Array  # (padded, d) float32, sharded over ``data``
  norms: jax.Array  # (padded,) cosine: max(|x|, eps); euclidean: |x|^2
  count: int  # real rows; the rest is padding, never returned
  distance: str
  block: int  # rows per scanned block on each device
  mesh: Mesh
  # euclidean: the library's first row, subtracted from the items (above) and every query
  centre: np.ndarray | None = None

  @property
  def dim(self) -> int:
    return int(self.items.shape[1])

  @classmethod
  def put(cls, items: np.ndarray | Sequence[np.ndarray], *, distance: Distance = "cosine",
          mesh: Mesh | None = None, block: int = 16384, where: str = "library") -> Library:
    """Pads ``items`` (m, d) to whole blocks on every device and places them on ``mesh``; bad
    rows (``checked_rows``) are an error naming ``where``.

    ``items`` may be a list of 2-D row blocks (e.g. an index's memory-mapped shards), read
    as their concatenation. Each device's rows are read, padded (and centred) on their own: the
    host never holds a second copy of the whole library.
    """
    if distance not in DISTANCES:
      raise ValueError(f"distance={distance!r}: expected one of {', '.join(DISTANCES)}")
    mesh = make_mesh() if mesh is None else mesh
    parts, dim, starts = [], None, [0]
    blocks = (list(items) if isinstance(items, (list, tuple)) and items
              and all(np.ndim(part) == 2 for part in items) else [items])
    for part in blocks:
      parts.append(checked_rows(part, dim, where, first_row=starts[-1]))
      dim = parts[-1].shape[1]
      starts.append(starts[-1] + len(parts[-1]))
    m = starts[-1]
    if m == 0:
      raise ValueError(f"{where}: expected at least one item, found 0")
    n_dev = mesh.shape[AXIS]
    per_device = -(-m // n_dev)
    block = max(1, min(int(block), per_device))
    per_device = -(-per_device // block) * block
    padded = per_device * n_dev
    # euclidean, as the metric: less the first row (integer data stays integer: exact ties)
    centre = _rows(parts, starts, 0, 1)[0].copy() if distance == "euclidean" else None

    sharding = NamedSharding(mesh, P(AXIS))

    def device_rows(device, lo, hi):
      """Rows lo:hi on ``device``, written in place piece by piece: the host holds one piece
      (``_PUT_ROWS`` rows) at a time besides the library it was given."""
      out = jnp.zeros((hi - lo, dim), jnp.float32, device=device)
      for a in range(lo, min(hi, m), _PUT_ROWS):
        rows = _rows(parts, starts, a, min(a + _PUT_ROWS, hi, m))
        if centre is not None:
          rows = checked_rows(rows - centre, dim, f"{where} (less its first row)", first_row=a)
        out = _write(out, jax.device_put(rows, device), a - lo)
      return out

    # Each device gets its rows and computes their norms: the library is never whole on one.
    index_of = sharding.addressable_devices_indices_map((padded, dim))
    items = jax.make_array_from_single_device_arrays(
        (padded, dim), sharding,
        [device_rows(d, *index_of[d][0].indices(padded)[:2]) for d in index_of])
    norm, sq = _norms(items)  # the padding's never matter: its ids are never returned
    return cls(items, norm if distance == "cosine" else sq, m, distance, block, mesh, centre)

  def search(self, queries: np.ndarray, k: int, *, approximate: bool = False,
             precision: str = "highest", query_block: int = 1024, where: str = "queries",
             k_name: str = "k") -> tuple[np.ndarray, np.ndarray]:
    """``(ids, distances)``, each (n, k), nearest first; ids are row numbers of the library.

    ``queries`` (n, dim) must be finite, ``k`` an int in ``1..count``; either is refused
    with a message that names ``where`` (or ``k_name``). No queries give (0, k) arrays.
    """
    queries = checked_rows(queries, self.dim, where)
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= self.count):
      raise ValueError(f"{k_name}={k!r}: expected an int from 1 to the {self.count} items "
                       "searched")
    n = len(queries)
    if n == 0:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    if self.centre is not None:
      queries = checked_rows(queries - self.centre, self.dim,
                             f"{where} (less the library's first row)")
    fn = _search_fn(self.mesh, k=int(k), block=self.block, count=self.count,
                    distance=self.distance, approximate=bool(approximate), precision=precision)
    # At least MIN_QUERY_BLOCK rows (padded): XLA compiles a one-row product otherwise (a
    # matrix-vector kernel) and rounds a query alone one ulp off the same query in a batch.
    qb = max(1, min(int(query_block), max(n, map_kernel.MIN_QUERY_BLOCK)))
    replicated = NamedSharding(self.mesh, P())
    outs = []
    for lo in range(0, n, qb):  # dispatched ahead: the host pads the next block meanwhile
      q = queries[lo:lo + qb]
      q = np.pad(q, ((0, qb - len(q)), (0, 0)))
      outs.append(fn(jax.device_put(q, replicated), self.items, self.norms))
    ids = np.concatenate([np.asarray(i) for i, _ in outs])[:n].astype(np.int64)
    dist = np.concatenate([np.asarray(s) for _, s in outs])[:n]
    return ids, dist


def checked_rows(rows, dim: int | None, where: str, *, first_row: int = 0) -> np.ndarray:
  """``rows`` as float32 (n, dim); a wrong shape, a non-finite row, or one whose squared norm
  overflows float32 (its distances would all be NaN or 1) is an error naming ``where`` and the
  row (numbered from ``first_row``)."""
  array = np.asarray(rows)
  if array.ndim != 2 or array.dtype.kind not in "fiub":
    raise ValueError(f"{where}: expected an (n, {dim or 'd'}) array of numbers, found "
                     f"{array.dtype} of shape {array.shape}")
  if dim is not None and array.shape[1] != dim:
    raise ValueError(f"{where}: expected {dim}-d rows (the library's), found "
                     f"{array.shape[1]}-d")
  array = array.astype(np.float32, copy=False)
  with np.errstate(over="ignore", invalid="ignore"):
    bad = np.flatnonzero(~np.isfinite(np.einsum("ij,ij->i", array, array)))
  if bad.size:
    why = ("is not finite (NaN or Inf" if not np.isfinite(array[bad[0]]).all() else
           "is too large (its squared norm overflows float32")
    raise ValueError(f"{where}: row {first_row + int(bad[0])} {why}; {bad.size} such rows)")
  return array


_PUT_ROWS = 1 << 16  # rows per piece written to a device (Library.put)


@functools.partial(jax.jit, donate_argnums=0)
def _write(out: jax.Array, rows: jax.Array, at) -> jax.Array:
  return jax.lax.dynamic_update_slice_in_dim(out, rows, at, 0)


def _rows(parts: Sequence[np.ndarray], starts: Sequence[int], lo: int, hi: int) -> np.ndarray:
  """Rows ``lo:hi`` of the concatenation of ``parts`` (``starts``: each part's first row)."""
  pieces = [part[max(lo - s, 0):hi - s] for part, s, e in zip(parts, starts, starts[1:])
            if s < hi and e > lo]
  return pieces[0] if len(pieces) == 1 else np.concatenate(pieces or [parts[0][:0]])


def _merge(values, ids, k: int):
  """The k best of concatenated candidates; among equal values the earlier position wins."""
  top, pos = jax.lax.top_k(values, k)
  return top, jnp.take_along_axis(ids, pos, axis=1)


def _approximates(mesh: Mesh) -> bool:
  """Whether ``approx_max_k`` is approximate on ``mesh``'s platform. Not on CPU: XLA:CPU
  computes it as an exact top-k whose ties fall in no set order, so the exact search (ties
  by the lower row) is the same work there."""
  return mesh.devices.flat[0].platform != "cpu"


@functools.lru_cache(maxsize=32)
def _search_fn(mesh: Mesh, *, k: int, block: int, count: int, distance: str,
               approximate: bool, precision: str):
  """``(queries, items, sq_norms) -> (ids, scores)``: one compiled program per shape."""
  precision = jax.lax.Precision[precision.upper()] if isinstance(precision, str) else precision
  approximate = approximate and _approximates(mesh)

  def local(q, items, norms):
    per_device = items.shape[0]
    offset = jax.lax.axis_index(AXIS) * per_device
    blocks = items.reshape(-1, block, items.shape[1])
    norm_blocks = norms.reshape(-1, block)
    q_norm, q_sq = _norms(q)
    kb = min(k, block)

    def body(carry, i):
      dots = jnp.dot(q, blocks[i].T, precision=precision)
      if distance == "cosine":  # as map_kernel.pairwise_distances, elementwise after the dots
        dist = 1.0 - dots / q_norm[:, None] / norm_blocks[i][None, :]
      else:
        dist = jnp.sqrt(jnp.maximum(q_sq[:, None] + norm_blocks[i][None, :] - 2.0 * dots, 0.0))
      ids = offset + i * block + jnp.arange(block, dtype=jnp.int32)
      # Nearest = largest score; +0.0 for an exact 0 (never -0.0, which would sort apart).
      scores = jnp.where(ids[None, :] < count, jnp.where(dist == 0, 0.0, -dist), -jnp.inf)
      if approximate:
        top, pos = jax.lax.approx_max_k(scores, kb)
      else:
        top, pos = jax.lax.top_k(scores, kb)
      merged = _merge(jnp.concatenate([carry[0], top], axis=1),
                      jnp.concatenate([carry[1], ids[pos]], axis=1), k)
      return merged, None

    init = (jnp.full((q.shape[0], k), -jnp.inf, q.dtype),
            jnp.full((q.shape[0], k), _NO_ID, jnp.int32))
    (top, ids), _ = jax.lax.scan(body, init, jnp.arange(blocks.shape[0]))
    # Every device's k best, device 0 first (the lowest ids), then the global k best.
    all_top = jax.lax.all_gather(top, AXIS, axis=1, tiled=True)
    all_ids = jax.lax.all_gather(ids, AXIS, axis=1, tiled=True)
    top, ids = _merge(all_top, all_ids, k)
    return ids, jnp.where(top == 0, 0.0, -top)

  mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                         out_specs=(P(), P()), check_vma=False)
  return jax.jit(mapped)
