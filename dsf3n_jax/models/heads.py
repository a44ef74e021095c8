"""The shared output head and the per-modality classifiers."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsf3n_jax.models.layers import Dropout, dense


class TwoLayerHead(nn.Module):
  """Flatten, Dense ``hidden`` -> ReLU -> Dropout -> Dense: what both heads compute.

  A subclass gives ``hidden``, its output width (``out_features``), whether
  the Dense layers have a bias and the output layer's name. The shared
  settings are keyword-only, so a subclass's own fields come first.

  Attributes:
    dropout_rate: dropout after the hidden layer (0.5; 0 disables).
  """

  dropout_rate: float = dataclasses.field(default=0.5, kw_only=True)
  dtype: Any = dataclasses.field(default=None, kw_only=True)
  param_dtype: Any = dataclasses.field(default=jnp.float32, kw_only=True)
  use_bias: ClassVar[bool] = True
  out_name: ClassVar[str] = "out"
  # Help and least value of the settings (config.model.head_kw / classifier_kw).
  settings_help: ClassVar[dict[str, str]] = {"hidden": "width of the hidden layer"}
  settings_min: ClassVar[dict[str, int]] = {"hidden": 1}

  @property
  def out_features(self) -> int:
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               example_ids: jax.Array | None = None) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.relu(dense(self.hidden, x.shape[-1], **kw, name="hidden")(x))
    x = Dropout(self.dropout_rate)(x, deterministic=not train, example_ids=example_ids)
    return dense(self.out_features, self.hidden, **kw, name=self.out_name)(x)


class OutputHead(TwoLayerHead):
  """Flatten tokens, Dense -> ReLU -> Dropout -> Dense: the retrieval embedding.

  One instance serves both modalities. Tokens are flattened token-major.

  Attributes:
    hidden: width of the hidden layer (512).
    features: embedding size (64).
  """

  hidden: int = 512
  features: int = 64

  @property
  def out_features(self) -> int:
    return self.features


class Classifier(TwoLayerHead):
  """Dense (no bias) -> ReLU -> Dropout -> Dense (no bias) -> logits, on (batch, dim).

  Attributes:
    num_classes: number of classes.
    hidden: width of the hidden layer (32).
  """

  num_classes: int
  hidden: int = 32
  use_bias: ClassVar[bool] = False
  out_name: ClassVar[str] = "logits"

  @property
  def out_features(self) -> int:
    return self.num_classes
