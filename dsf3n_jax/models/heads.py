"""The shared output head and the per-modality classifiers (SPEC steps 5-6)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsf3n_jax.models.layers import Dropout, dense


class OutputHead(nn.Module):
  """Flatten tokens, Dense -> ReLU -> Dropout -> Dense: the retrieval embedding.

  One instance serves both modalities. Tokens are flattened token-major.

  Attributes:
    hidden: width of the hidden layer (512).
    features: embedding size (64).
    dropout_rate: dropout after the hidden layer (0.5; 0 disables).
  """

  hidden: int = 512
  features: int = 64
  dropout_rate: float = 0.5
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool,
               example_ids: jax.Array | None = None) -> jax.Array:
    return _mlp(self, tokens.reshape(tokens.shape[0], -1), self.features, use_bias=True,
                out_name="out", train=train, example_ids=example_ids)


class Classifier(nn.Module):
  """Dense (no bias) -> ReLU -> Dropout -> Dense (no bias) -> logits.

  Attributes:
    num_classes: number of classes.
    hidden: width of the hidden layer (32).
    dropout_rate: dropout after the hidden layer (0.5; 0 disables).
  """

  num_classes: int
  hidden: int = 32
  dropout_rate: float = 0.5
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               example_ids: jax.Array | None = None) -> jax.Array:
    return _mlp(self, x, self.num_classes, use_bias=False, out_name="logits", train=train,
                example_ids=example_ids)


def _mlp(module: OutputHead | Classifier, x: jax.Array, features: int, *, use_bias: bool,
         out_name: str, train: bool, example_ids: jax.Array | None) -> jax.Array:
  """Dense ``hidden`` -> ReLU -> Dropout -> Dense ``out_name``, inside ``module``'s call."""
  kw = dict(use_bias=use_bias, dtype=module.dtype, param_dtype=module.param_dtype)
  x = nn.relu(dense(module.hidden, x.shape[-1], **kw, name="hidden")(x))
  x = Dropout(module.dropout_rate)(x, deterministic=not train, example_ids=example_ids)
  return dense(features, module.hidden, **kw, name=out_name)(x)
