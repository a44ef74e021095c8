"""Input pipeline: host-sharded train/eval batches and on-device splits of data sources.

Batches are global ``jax.Array``s sharded over the ``data`` axis of a mesh,
built with ``jax.make_array_from_process_local_data``: each process reads only
the contiguous rows of each global batch that land on its devices. The sources
themselves (and ``load_sources``, by dataset name) are in
``dsf3n_jax.datasets.sources``; their names are re-exported here.

The shuffled order of epoch ``e`` is ``epoch_permutation(seed, e, n)``; batch
``b`` is ``perm[b*B:(b+1)*B]`` (last partial batch dropped). File-order mode
uses ``arange(n)``, the original's unshuffled batches.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsf3n_jax.datasets.sources import (
  DATASETS,
  FIELDS,
  ArraySource,
  SharedItemsWarning,
  Source,
  Sources,
  StandardizedSource,
  SubsetSource,
  TfdsSource,
  carve_validation,
  duplicate_groups,
  load_sources,
  load_split_arrays,
  standardize,
  standardized,
  stratified_split,
)
from dsf3n_jax.datasets.validation import DataValidationError
from dsf3n_jax.mesh import DATA_AXIS


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> jax.Array:
  """The shuffled order of one epoch (THE definition, shared with on-device epochs).

  Args:
    seed: shuffling seed.
    epoch: epoch number (may be traced).
    num_examples: split size (static under jit).

  Returns:
    (num_examples,) int32 permutation.
  """
  return jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), num_examples)


def _sharding(mesh: Mesh) -> NamedSharding:
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"mesh axes {mesh.axis_names} have no {DATA_AXIS!r} axis")
  return NamedSharding(mesh, P(DATA_AXIS))


def process_rows(global_batch_size: int, *, mesh: Mesh, process_index: int | None = None,
                 process_count: int | None = None) -> tuple[int, int]:
  """The contiguous rows ``[lo, hi)`` of a global batch this process reads.

  Args:
    global_batch_size: B.
    mesh: the mesh with a ``data`` axis.
    process_index, process_count: injected for tests; default: from the
      mesh's addressable devices (contiguous, in process-index order for
      ``dsf3n_jax.mesh.make_mesh``).

  Returns:
    ``(lo, hi)``.
  """
  if process_index is not None or process_count is not None:
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if global_batch_size % pc:
      raise ValueError(f"global_batch_size {global_batch_size} not divisible by {pc} processes")
    per = global_batch_size // pc
    return pi * per, (pi + 1) * per
  index_map = _sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  starts = sorted({(s[0].start or 0, s[0].stop or global_batch_size)
                   for s in index_map.values()})
  lo, hi = starts[0][0], starts[-1][1]
  if sum(b - a for a, b in starts) != hi - lo:
    raise ValueError("this process's devices do not hold a contiguous part of the batch; "
                     "build the mesh with dsf3n_jax.mesh.make_mesh (devices in process order)")
  return lo, hi


def _check_batch(global_batch_size: int, mesh: Mesh, n: int | None) -> None:
  if global_batch_size < 1 or global_batch_size % mesh.size:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                     f"the mesh size {mesh.size}")
  if n is not None and global_batch_size > n:
    raise ValueError(f"global_batch_size {global_batch_size} exceeds the split size {n}")


def _to_global(host: Mapping[str, np.ndarray], *, sharding: NamedSharding,
               global_batch_size: int) -> dict[str, jax.Array]:
  out = {}
  for k, v in host.items():
    if k == "index" and not jax.config.jax_enable_x64:
      v = v.astype(np.int32)  # JAX without x64 has no int64.
    out[k] = jax.make_array_from_process_local_data(
        sharding, v, (global_batch_size,) + v.shape[1:])
  return out


class TrainLoader:
  """Endless, resumable, host-sharded train batches.

  ``epoch`` and ``step`` give the position of the NEXT batch (after the last
  batch of an epoch they read ``epoch + 1, 0``).

  Args:
    source: a source (see module docstring).
    global_batch_size: B, a multiple of the mesh size, at most ``len(source)``.
    mesh: mesh with a ``data`` axis.
    seed: shuffling seed.
    shuffle: True: ``epoch_permutation`` order; False: file order.
    start_epoch: first epoch.
    prefetch: read the next batch in a background thread.
    process_index, process_count: injected for tests (see ``process_rows``).
  """

  def __init__(self, source: Source, *, global_batch_size: int, mesh: Mesh, seed: int = 0,
               shuffle: bool = True, start_epoch: int = 0, prefetch: bool = True,
               process_index: int | None = None, process_count: int | None = None):
    self.source = source
    self.num_examples = len(source)
    _check_batch(global_batch_size, mesh, self.num_examples)
    self.global_batch_size = global_batch_size
    self.mesh = mesh
    self.sharding = _sharding(mesh)
    self.lo, self.hi = process_rows(global_batch_size, mesh=mesh, process_index=process_index,
                                    process_count=process_count)
    self.steps_per_epoch = self.num_examples // global_batch_size
    self.seed, self.shuffle = int(seed), bool(shuffle)
    self.epoch, self.step = int(start_epoch), 0
    self._order_cache: tuple[tuple, np.ndarray] | None = None
    self._executor = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
                      if prefetch else None)
    self._pending = None  # ((epoch, step, seed, shuffle), future)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The order of all rows in ``epoch`` (global, all processes)."""
    key = (self.seed, self.shuffle, epoch)
    if self._order_cache is None or self._order_cache[0] != key:
      order = (np.asarray(jax.device_get(epoch_permutation(self.seed, epoch, self.num_examples)))
               if self.shuffle else np.arange(self.num_examples))
      self._order_cache = (key, order.astype(np.int64))
    return self._order_cache[1]

  def global_indices(self, epoch: int, step: int) -> np.ndarray:
    """Rows of global batch ``step`` of ``epoch``."""
    b = self.global_batch_size
    return self.epoch_order(epoch)[step * b:(step + 1) * b]

  def local_indices(self, epoch: int, step: int) -> np.ndarray:
    """The rows of that batch this process reads."""
    return self.global_indices(epoch, step)[self.lo:self.hi]

  def get_state(self) -> dict[str, Any]:
    """Position of the next batch: JSON-able ``dict(epoch, step, seed, shuffle)``."""
    return dict(epoch=int(self.epoch), step=int(self.step), seed=int(self.seed),
                shuffle=bool(self.shuffle))

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues exactly where the iterator that gave ``state`` would."""
    step = int(state["step"])
    if not 0 <= step < self.steps_per_epoch:
      raise ValueError(f"loader state step {step} outside 0..{self.steps_per_epoch - 1}")
    self.epoch, self.step = int(state["epoch"]), step
    self.seed = int(state.get("seed", self.seed))
    self.shuffle = bool(state.get("shuffle", self.shuffle))
    self._pending = None

  def _position(self) -> tuple:
    return (self.epoch, self.step, self.seed, self.shuffle)

  def _submit(self) -> None:
    if self._executor is not None:
      idx = self.local_indices(self.epoch, self.step)
      self._pending = (self._position(), self._executor.submit(self.source.__getitems__, idx))

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._pending is not None and self._pending[0] == self._position():
      host = self._pending[1].result()
    else:
      host = self.source.__getitems__(self.local_indices(self.epoch, self.step))
    self._pending = None
    self.step += 1
    if self.step == self.steps_per_epoch:
      self.epoch, self.step = self.epoch + 1, 0
    self._submit()
    return _to_global(host, sharding=self.sharding, global_batch_size=self.global_batch_size)

  def close(self) -> None:
    """Stops the prefetch thread."""
    if self._executor is not None:
      self._executor.shutdown(wait=True, cancel_futures=True)
      self._executor = None
    self._pending = None


def eval_batch_rows(num_examples: int, *, global_batch_size: int, lo: int,
                    hi: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Per eval batch: this process's rows (-1 for padding) and its mask.

  Args:
    num_examples: split size.
    global_batch_size: B.
    lo, hi: this process's part of each batch (``process_rows``).

  Yields:
    ``(rows, mask)`` of shape (hi - lo,) each, in file order.
  """
  num_batches = -(-num_examples // global_batch_size)
  for b in range(num_batches):
    rows = b * global_batch_size + np.arange(lo, hi, dtype=np.int64)
    real = rows < num_examples
    yield np.where(real, rows, -1), real.astype(np.float32)


def eval_batches(source: Source, *, global_batch_size: int, mesh: Mesh,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, jax.Array]]:
  """Every item of ``source`` exactly once, in file order; the last batch padded.

  Args:
    source: a source.
    global_batch_size: B, a multiple of the mesh size.
    mesh: mesh with a ``data`` axis.
    process_index, process_count: injected for tests.

  Yields:
    Dicts as ``TrainLoader`` plus ``mask`` (B,) float32 (0 on padding rows,
    whose ``index`` is -1 and features 0).
  """
  _check_batch(global_batch_size, mesh, None)
  n = len(source)
  if n == 0:
    return
  sharding = _sharding(mesh)
  lo, hi = process_rows(global_batch_size, mesh=mesh, process_index=process_index,
                        process_count=process_count)
  template = source.__getitems__(np.zeros((1,), np.int64))
  for rows, mask in eval_batch_rows(n, global_batch_size=global_batch_size, lo=lo, hi=hi):
    real = mask > 0
    got = source.__getitems__(rows[real]) if real.any() else None
    host = {}
    for k, t in template.items():
      fill = -1 if k == "index" else 0
      v = np.full((hi - lo,) + t.shape[1:], fill, t.dtype)
      if got is not None:
        v[real] = got[k]
      host[k] = v
    host["mask"] = mask
    yield _to_global(host, sharding=sharding, global_batch_size=global_batch_size)


def to_device(arrays: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Copies arrays to every device of ``mesh``, replicated (``P()``), for on-device epochs.

  Every process must pass the same arrays.

  Args:
    arrays: dict of numpy arrays (e.g. ``load_split_arrays``).
    mesh: the mesh.

  Returns:
    Dict of replicated global ``jax.Array``s.
  """
  sharding = NamedSharding(mesh, P())
  out = {}
  for k, v in arrays.items():
    v = np.asarray(v)
    if v.dtype == np.int64 and not jax.config.jax_enable_x64:
      v = v.astype(np.int32)
    out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
  return out


__all__ = [
    "DATASETS", "FIELDS", "ArraySource", "DataValidationError", "SharedItemsWarning", "Source",
    "Sources", "StandardizedSource", "SubsetSource", "TfdsSource", "TrainLoader",
    "carve_validation", "duplicate_groups", "epoch_permutation",
    "eval_batches", "load_sources", "load_split_arrays", "process_rows", "standardize",
    "standardized", "stratified_split", "to_device",
]
