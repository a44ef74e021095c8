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


def place(tree, abstract):
  """The values of ``tree`` (host arrays, or arrays on one device; the same on every process)
  placed as the leaves of ``abstract`` (the same tree) say: on their sharding; a leaf without
  one is left as it is. Shardings of this process's devices alone are placed in one
  ``device_put``; others (several processes) each process fills with the shards of its own
  devices, from a host copy."""
  leaves, treedef = jax.tree.flatten(tree)
  targets = jax.tree.leaves(abstract)
  local = [i for i, t in enumerate(targets)
           if t.sharding is not None and t.sharding.is_fully_addressable]
  out = list(leaves)
  for i, x in zip(local, jax.device_put([leaves[i] for i in local],
                                        [targets[i].sharding for i in local])):
    out[i] = x

  def from_host(x, target):
    host = np.asarray(x)
    return jax.make_array_from_callback(target.shape, target.sharding, lambda index: host[index])

  for i, t in enumerate(targets):
    if t.sharding is not None and not t.sharding.is_fully_addressable:
      out[i] = from_host(leaves[i], t)
  return jax.tree.unflatten(treedef, out)


def replicate(tree, sharding: jax.sharding.Sharding):
  """Every leaf of ``tree`` (the same values on every process) placed on ``sharding``, a
  replicated one (``place``)."""
  return place(tree, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree))
