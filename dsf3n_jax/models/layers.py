"""Building blocks shared by the DSF3N modules.

The original model is written in PyTorch; these layers reproduce the pieces
whose PyTorch behaviour differs from Flax's stock layers:

* ``torch_kernel_init`` / ``torch_bias_init``: PyTorch's default
  initialisation, uniform in +-1/sqrt(fan_in) for weights *and* biases.
* ``BatchNorm``: normalises with the biased batch variance but updates the
  running variance with the unbiased one (PyTorch's rule), computes the
  variance in two passes, and can synchronise statistics over a mapped axis.
* ``Bilinear``: ``nn.Bilinear`` without bias, computed as one matrix product
  of the flattened outer product so that forward and backward run at
  matrix-multiply speed.
* ``Dropout``: draws its mask per example from a key folded with the
  example's (global) index, so that the same global batch gets the same masks
  however it is split over devices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsf3n_jax.mesh import pmean

Array = jax.Array
Dtype = Any


def torch_kernel_init():
  """PyTorch's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  ``kaiming_uniform_(a=sqrt(5))`` has bound sqrt(6 / ((1 + 5) fan_in)), which
  is variance scaling with scale 1/3, fan_in mode, uniform. Flax's fan_in for a
  kernel of shape (..., in, out) is the product of all but the last axis, the
  same as PyTorch's in_features or in_channels * kernel_size.
  """
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def uniform_init(bound: float):
  """U(-bound, bound)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_bias_init(fan_in: int):
  """PyTorch's default bias init for a layer with ``fan_in`` inputs."""
  return uniform_init(1.0 / math.sqrt(fan_in))


def _accumulating(op):
  """``op`` (``lax.dot_general`` / ``conv_general_dilated``) accumulating in at least float32,
  its result in the operands' dtype: with bf16 operands, the native bf16 x bf16 -> f32
  product of accelerators and of CPUs with AMX/AVX512-BF16, instead of an emulated bf16
  output; float32 and float64 products are unchanged."""
  @functools.wraps(op)
  def accumulate(lhs, rhs, *args, preferred_element_type=None, **kwargs):
    del preferred_element_type
    out = op(lhs, rhs, *args, preferred_element_type=jnp.promote_types(lhs.dtype, jnp.float32),
             **kwargs)
    return out.astype(lhs.dtype)
  return accumulate


dot_general = _accumulating(jax.lax.dot_general)
conv_general_dilated = _accumulating(jax.lax.conv_general_dilated)


def dense(features: int, fan_in: int, *, use_bias: bool = True, dtype=None,
          param_dtype=jnp.float32, name: str | None = None) -> nn.Dense:
  """``nn.Dense`` initialised like ``torch.nn.Linear`` (products accumulated in float32)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=torch_kernel_init(), bias_init=torch_bias_init(fan_in),
                  dot_general=dot_general, name=name)


class BatchNorm(nn.Module):
  """BatchNorm over the last (channel) axis with PyTorch's semantics.

  Train mode normalises with the batch mean and the *biased* batch variance
  and updates ``running_var`` with the *unbiased* one, as
  ``torch.nn.BatchNorm1d`` does (Flax's ``nn.BatchNorm`` uses the biased one).
  Statistics are reduced over every axis but the last, in float32, in two
  passes. With ``axis_name`` they are averaged over that mapped axis, so a
  data-parallel step sees the statistics of the global batch (all shards
  must have the same size).

  Attributes:
    momentum: weight of the old running statistics (PyTorch momentum 0.1 is
      0.9 here).
    epsilon: added to the variance.
    axis_name: mapped axis to synchronise the statistics over, or None.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    # Statistics at least float32, float64 with float64 parameters.
    stats_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), stats_dtype))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), stats_dtype))

    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    reduce_axes = tuple(range(x.ndim - 1))
    if train:
      count = math.prod(x.shape[:-1])
      mean = xf.mean(reduce_axes)
      mean = pmean(mean, self.axis_name)
      var = pmean(jnp.square(xf - mean).mean(reduce_axes), self.axis_name)  # biased, 2nd pass
      if self.axis_name is not None:
        count = count * jax.lax.axis_size(self.axis_name)
      if not self.is_initializing():
        unbiased = var * (count / jnp.maximum(count - 1, 1))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean.astype(ra_mean.value.dtype)
        ra_var.value = m * ra_var.value + (1 - m) * unbiased.astype(ra_var.value.dtype)
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale + bias
    dtype = self.dtype or x.dtype
    return y.astype(dtype)


# Rows of the kernel's first axis per block of the product and the inputs' gradients (an
# (8 * in2)-wide outer product), and of its second axis per block of the kernel's gradient.
BILINEAR_BLOCK = 8


def _blocks(size: int) -> int:
  """The block of ``bilinear`` over an axis of ``size``: ``BILINEAR_BLOCK`` when it divides
  ``size``, else (or when it is None) all of it."""
  return BILINEAR_BLOCK if BILINEAR_BLOCK and size % BILINEAR_BLOCK == 0 else size


def _dot_f32(a: Array, b: Array, contract: tuple[int, int], precision: Any) -> Array:
  """``a`` times ``b`` over one axis each, accumulated (and returned) in at least float32."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             precision=precision,
                             preferred_element_type=jnp.promote_types(a.dtype, jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def bilinear(x: Array, z: Array, kernel: Array, precision: Any = None) -> Array:
  """``y[b, o] = sum_ij x[b, i] z[b, j] kernel[i, j, o]`` as matrix products over blocks.

  The flattened outer product of the inputs (batch, in1 * in2) times the
  kernel reshaped to (in1 * in2, out) is one matrix product, but its outer
  product (384 x 65,536 floats at batch 128: 100 MB) would go to memory and
  back. Here a ``lax.scan`` over blocks of ``BILINEAR_BLOCK`` rows of ``in1``
  builds each block's outer product (batch, block * in2) and multiplies it by
  the kernel's rows while it is in cache, accumulating in float32 (the 100 MB
  never exist; ``python -m benchmarks.bilinear``, alone on a 2-core AMD EPYC: the
  forward in 98 ms instead of 121 ms at batch 128, forward and backward in 306 ms instead
  of 517 ms). The backward pass (written
  by hand) goes over the same blocks for the input gradients: ``dy`` times the
  block's kernel rows (contracted on their last axis: no transposed copy of the
  kernel) gives that block's share. The kernel gradient goes over blocks of
  ``in2``: ``x`` transposed (once) times the outer product of the block's ``z``
  columns and ``dy``, built untransposed (built transposed, as blocks of ``in1``
  would need it, it took 2.5x the forward's build), the blocks put in
  place at the end (the forward and backward of the step's two bilinears, 2-core
  AMD EPYC: about 0.9x the time of the ``in1``-blocked backward).

  Args:
    x: (batch, in1).
    z: (batch, in2).
    kernel: (in1, in2, out).
    precision: passed to the matrix products.

  Returns:
    (batch, out), in the inputs' dtype.
  """
  (in1, in2, out), batch = kernel.shape, x.shape[0]
  block = _blocks(in1)
  xb = x.reshape(batch, in1 // block, block).transpose(1, 0, 2)
  kb = kernel.reshape(in1 // block, block * in2, out)

  def body(acc, xs_kk):
    xs, kk = xs_kk
    outer = (xs[:, :, None] * z[:, None, :]).reshape(batch, block * in2)
    return acc + _dot_f32(outer, kk, (1, 0), precision), None

  acc = jnp.zeros((batch, out), jnp.promote_types(x.dtype, jnp.float32))
  return jax.lax.scan(body, acc, (xb, kb))[0].astype(x.dtype)


def _bilinear_fwd(x, z, kernel, precision):
  return bilinear(x, z, kernel, precision), (x, z, kernel)


def _bilinear_bwd(precision, residuals, dy):
  x, z, kernel = residuals
  (in1, in2, out), batch = kernel.shape, x.shape[0]
  block = _blocks(in1)
  xb = x.reshape(batch, in1 // block, block).transpose(1, 0, 2)
  kb = kernel.reshape(in1 // block, block * in2, out)
  dy = dy.astype(x.dtype)

  def inputs(dz, xs_kk):  # over blocks of in1: the inputs' gradients
    xs, kk = xs_kk
    douter = _dot_f32(dy, kk, (1, 1), precision).reshape(batch, block, in2)
    dxs = jnp.einsum("bij,bj->bi", douter, z, precision=precision)
    dz = dz + jnp.einsum("bij,bi->bj", douter, xs, precision=precision)
    return dz, dxs

  dz = jnp.zeros((batch, in2), jnp.promote_types(z.dtype, jnp.float32))
  dz, dxb = jax.lax.scan(inputs, dz, (xb, kb))
  dx = dxb.transpose(1, 0, 2).reshape(batch, in1)

  # Over blocks of in2: the kernel's gradient for those columns, x^T times the untransposed
  # outer product of the block's z and dy (building it transposed, as the kernel's rows
  # would need, is the slow way round); the blocks are put in place once, at the end.
  jblock = _blocks(in2)
  zb = z.reshape(batch, in2 // jblock, jblock).transpose(1, 0, 2)
  xt = x.T

  def kernel_grad(carry, zs):
    outer = (zs[:, :, None] * dy[:, None, :]).reshape(batch, jblock * out)
    return carry, _dot_f32(xt, outer, (1, 0), precision).astype(kernel.dtype)

  _, dkb = jax.lax.scan(kernel_grad, None, zb)
  dkernel = dkb.reshape(in2 // jblock, in1, jblock, out).transpose(1, 0, 2, 3)
  return dx.astype(x.dtype), dz.astype(z.dtype), dkernel.reshape(in1, in2, out)


bilinear.defvjp(_bilinear_fwd, _bilinear_bwd)


class Bilinear(nn.Module):
  """``torch.nn.Bilinear`` without bias: ``y_o = sum_ij x_i W_oij z_j``.

  The kernel is stored as (in1, in2, out), i.e. PyTorch's (out, in1, in2)
  transposed, so that the flattened outer product of the two inputs
  (batch, in1 * in2) multiplies the kernel reshaped to (in1 * in2, out)
  without a transpose; see ``bilinear`` for the backward pass.

  Attributes:
    features: output size.
    precision: passed to the matrix products.
  """

  features: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, z: Array) -> Array:
    in1, in2 = x.shape[-1], z.shape[-1]
    # PyTorch: bound = 1 / sqrt(in1_features).
    kernel = self.param("kernel", uniform_init(1.0 / math.sqrt(in1)),
                        (in1, in2, self.features), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, z, kernel)
    x, z, kernel = (a.astype(dtype) for a in (x, z, kernel))
    batch_shape = x.shape[:-1]
    y = bilinear(x.reshape(-1, in1), z.reshape(-1, in2), kernel, self.precision)
    return y.reshape(*batch_shape, self.features)


def example_keys(key: jax.Array, example_ids: Array) -> jax.Array:
  """One key per example, ``fold_in(key, example_id)``: draws that do not depend on how the
  batch is split over devices."""
  return jax.vmap(jax.random.fold_in, (None, 0))(key, example_ids)


class Dropout(nn.Module):
  """Inverted dropout whose mask is a function of (rng, example index).

  ``nn.Dropout`` draws one mask for the whole array, so the mask an example
  gets depends on how the batch is split over devices. Here each example's
  mask is drawn from ``fold_in(key, example_id)``; pass the examples' global
  indices as ``example_ids`` and the update no longer depends on the device
  count. Without ``example_ids`` the position in the batch is used.

  Attributes:
    rate: probability of dropping a value.
    rng_collection: the rng stream to draw from.
  """

  rate: float
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool,
               example_ids: Array | None = None) -> Array:
    if not 0.0 <= self.rate <= 1.0:
      raise ValueError(f"dropout rate: expected a probability in [0, 1], got {self.rate!r}")
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    key = self.make_rng(self.rng_collection)
    if example_ids is None:
      example_ids = jnp.arange(x.shape[0])
    keep_prob = 1.0 - self.rate
    keys = example_keys(key, example_ids)
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, keep_prob, x.shape[1:]))(keys)
    return jnp.where(keep, x / keep_prob, jnp.zeros_like(x)).astype(x.dtype)


def max_pool(x: Array, window: int) -> Array:
  """Max pooling over the length axis of (batch, length, channels)."""
  return nn.max_pool(x, (window,), strides=(window,))


def conv1d(features: int, kernel_size: int, in_features: int, *, stride: int = 1,
           padding: int | Sequence[tuple[int, int]] | str = "SAME", dtype=None,
           param_dtype=jnp.float32, name: str | None = None) -> nn.Conv:
  """``nn.Conv`` over (batch, length, channels) initialised like ``torch.nn.Conv1d``."""
  if isinstance(padding, int):
    padding = [(padding, padding)]
  return nn.Conv(features, (kernel_size,), strides=(stride,), padding=padding, dtype=dtype,
                 param_dtype=param_dtype, conv_general_dilated=conv_general_dilated,
                 kernel_init=torch_kernel_init(),
                 bias_init=torch_bias_init(in_features * kernel_size), name=name)
