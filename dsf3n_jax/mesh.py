"""The data-parallel mesh: its one axis name and the mesh over every device."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

DATA_AXIS = "data"  # batches are split over it; parameters are replicated


def make_mesh(devices=None) -> Mesh:
  """A one-axis ``data`` mesh over ``devices`` (default: every device of every process), in
  process order: each process's devices hold one contiguous block of a batch, the rows it
  reads (``input_pipeline.process_rows``).

  ``jax.make_mesh`` would order a TPU pod's devices along its physical torus, which
  interleaves the hosts. A collective over the one axis spans every device whatever their
  order, so the process order costs nothing.
  """
  devices = jax.devices() if devices is None else list(devices)
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(ordered, dtype=object), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def single(axis_name: str | None) -> bool:
  """No mapped axis, or one of one device: every collective over it is the identity."""
  return axis_name is None or jax.lax.axis_size(axis_name) == 1


def pmean(x, axis_name: str | None):
  """``lax.pmean`` of a pytree over ``axis_name``; ``x`` itself (no collective) where the
  axis is ``single``."""
  return x if single(axis_name) else jax.lax.pmean(x, axis_name)


def psum(x, axis_name: str | None):
  """``lax.psum`` of a pytree over ``axis_name``; ``x`` itself where the axis is ``single``."""
  return x if single(axis_name) else jax.lax.psum(x, axis_name)


def replicate(tree, sharding: jax.sharding.Sharding):
  """Every leaf of ``tree`` (the same values on every process) placed on ``sharding``, a
  replicated one; across processes each process supplies the copies of its own devices."""
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)

  def place(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(place, tree)
