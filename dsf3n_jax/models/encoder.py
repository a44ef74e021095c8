"""The modality encoder: one dense layer and a ReLU."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsf3n_jax.models.layers import dense


class ModalityEncoder(nn.Module):
  """``h = relu(Dense(features)(x))``; one instance per modality, not shared.

  Attributes:
    features: width of the encoded signal (1024 in the reference).
  """

  features: int = 1024
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = dense(self.features, x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
              name="dense")(x)
    return nn.relu(h)
