"""The fine-grained multi-scale Conv1d net.

The encoded vector (batch, L) is read as a one-channel signal of length L,
laid out (batch, length, channels) as Flax convolutions expect. BatchNorm over
the single channel, a strided stem convolution and max pool, then one branch
per kernel size (convolution + max pool per stage), a global max pool, and the
branch vectors stacked as tokens. There are no activation functions: the
reference uses convolution and max pooling only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsf3n_jax.models.layers import BatchNorm, conv1d, max_pool


def positions_left(length: int, kernel: int, stride: int, padding: int, stages: int,
                   pool: int = 2) -> int:
  """Positions a branch max-pools globally: after the stem and ``1 + stages`` max-pools."""
  positions = (length + 2 * padding - kernel) // stride + 1
  for _ in range(1 + stages):
    positions //= pool
  return positions


class FineGrainedNet(nn.Module):
  """Multi-scale Conv1d feature extractor: (batch, L) -> (batch, tokens, dim).

  Parameters are named after the original (``bn``, ``stem`` for ``conv1``,
  ``conv{k}_{i}`` for the i-th convolution of the branch with kernel k).

  Attributes:
    kernel_sizes: one branch per kernel size; token order follows it.
    stem_features, stem_kernel, stem_stride, stem_padding: the stem
      convolution (64, 32, 8, 12 in the reference: 1024 -> 128 positions).
    branch_features: output channels of each branch stage; the last one is
      the token dimension.
    pool: max-pool window after the stem and after each branch stage.
    bn_momentum, bn_epsilon: BatchNorm settings (Flax momentum convention).
    axis_name: mapped axis over which BatchNorm statistics are synchronised.
  """

  kernel_sizes: Sequence[int] = (3, 5, 7)
  stem_features: int = 64
  stem_kernel: int = 32
  stem_stride: int = 8
  stem_padding: int = 12
  branch_features: Sequence[int] = (64, 128, 256)
  pool: int = 2
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, *, train: bool) -> jax.Array:
    if not self.kernel_sizes or not self.branch_features:
      raise ValueError(f"kernel_sizes={tuple(self.kernel_sizes)}, branch_features="
                       f"{tuple(self.branch_features)}: expected at least one branch and stage")
    if positions_left(h.shape[-1], self.stem_kernel, self.stem_stride, self.stem_padding,
                      len(self.branch_features), self.pool) < 1:
      raise ValueError(
          f"encoder features {h.shape[-1]}: too short for the stem (kernel "
          f"{self.stem_kernel}, stride {self.stem_stride}, padding {self.stem_padding}) and "
          f"{1 + len(self.branch_features)} max-pools by {self.pool}: no position is left")
    x = h[..., None]  # (batch, length, 1)
    x = BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon, axis_name=self.axis_name,
                  dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x, train=train)
    x = conv1d(self.stem_features, self.stem_kernel, 1, stride=self.stem_stride,
               padding=self.stem_padding, dtype=self.dtype, param_dtype=self.param_dtype,
               name="stem")(x)
    x = max_pool(x, self.pool)
    tokens = []
    for k in self.kernel_sizes:
      if k % 2 != 1:
        raise ValueError(f"kernel_sizes: 'same' padding (k-1)/2 needs odd kernels, got {k}")
      y, in_features = x, self.stem_features
      for i, features in enumerate(self.branch_features, start=1):
        y = conv1d(features, k, in_features, padding=(k - 1) // 2, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=f"conv{k}_{i}")(y)
        y = max_pool(y, self.pool)
        in_features = features
      tokens.append(jnp.max(y, axis=1))  # global max pool over the remaining positions
    return jnp.stack(tokens, axis=1)
