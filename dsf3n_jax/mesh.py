"""The data-parallel mesh: its one axis name and the mesh over every device."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

DATA_AXIS = "data"  # batches are split over it; parameters are replicated


def make_mesh(devices=None) -> Mesh:
  """A one-axis ``data`` mesh over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
