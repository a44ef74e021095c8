"""Multi-modal fusion attention (MFA, paper Eq. 3-4) and the two-stage fusion (Eq. 5).

One ``MultiModalFusionAttention`` instance is reused by every fusion stage
(the paper's shared weight strategy).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsf3n_jax.config_schema import is_int
from dsf3n_jax.models.layers import Bilinear, dense

Variant = Literal["reference", "paper"]


class MultiModalFusionAttention(nn.Module):
  """MFA: fuses visual tokens ``x`` and audio tokens ``y`` (batch, tokens, dim).

  ``variant="reference"`` computes what the original code computes::

      A_va = softmax(Qv Ka^T) s   A_vv = softmax(Qv Kv^T) s    (s = 1/sqrt(dim),
      A_av = softmax(Qa Kv^T) s   A_aa = softmax(Qa Ka^T) s     after the softmax)
      G_v = sigmoid((w1(A_va y) + w2(A_vv x)) * (A_vv x))
      G_a = sigmoid((w3(A_av x) + w4(A_aa y)) * (A_aa y))
      J   = sigmoid(bilinear(G_v, G_a))
      M   = (t_c J) * x + (1 - J) * y

  ``variant="paper"`` follows Eq. 3-4 as printed: ``G_v = sigmoid(w1(A_va y) +
  A_vv x) * (A_vv x)`` (likewise for audio with w3) and ``M = J x + (1 - J) y``
  (no ``t_c``, no w2/w4).

  Attributes:
    variant: "reference" (default) or "paper".
  """

  variant: Variant = "reference"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _dense(self, dim: int, name: str) -> nn.Dense:
    return dense(dim, dim, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if self.variant not in ("reference", "paper"):
      raise ValueError(f"variant: expected 'reference' or 'paper', got {self.variant!r}")
    if x.shape != y.shape:
      raise ValueError(f"MFA inputs must have the same shape, got {x.shape} and {y.shape}")
    dim = x.shape[-1]
    scale = 1.0 / math.sqrt(dim)
    q_v, q_a = self._dense(dim, "q_v")(x), self._dense(dim, "q_a")(y)
    k_v, k_a = self._dense(dim, "k_v")(x), self._dense(dim, "k_a")(y)

    def attend(q, k, values):
      weights = jax.nn.softmax(jnp.einsum("...td,...sd->...ts", q, k), axis=-1) * scale
      return jnp.einsum("...ts,...sd->...td", weights, values.astype(weights.dtype))

    phi_va, phi_v = attend(q_v, k_a, y), attend(q_v, k_v, x)
    phi_av, phi_a = attend(q_a, k_v, x), attend(q_a, k_a, y)
    if self.variant == "reference":
      g_v = nn.sigmoid((self._dense(dim, "w_1")(phi_va) + self._dense(dim, "w_2")(phi_v)) * phi_v)
      g_a = nn.sigmoid((self._dense(dim, "w_3")(phi_av) + self._dense(dim, "w_4")(phi_a)) * phi_a)
    else:
      g_v = nn.sigmoid(self._dense(dim, "w_1")(phi_va) + phi_v) * phi_v
      g_a = nn.sigmoid(self._dense(dim, "w_3")(phi_av) + phi_a) * phi_a
    j = nn.sigmoid(Bilinear(dim, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="bilinear")(g_v, g_a))
    if self.variant == "reference":
      t_c = self.param("t_c", nn.initializers.ones, (), self.param_dtype)
      return (t_c.astype(j.dtype) * j) * x + (1 - j) * y
    return j * x + (1 - j) * y


class TwoStageFusion(nn.Module):
  """Paper Eq. 5 with ``num_stages`` stages (2 in the reference), one shared MFA.

  ``M_1 = MFA(F_v, F_a)``; for s > 1, ``M_s = MFA(M_{s-1} F_v, M_{s-1} F_a)``;
  output ``(M_n F_v, M_n F_a)``. ``num_stages=0`` returns the inputs (the
  ablation without MFA).
  """

  num_stages: int = 2
  variant: Variant = "reference"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  # Help and least value of the settings (config.model.fusion_kw).
  settings_help: ClassVar[dict[str, str]] = {
      "num_stages": "MFA applications sharing one set of weights; 0: the ablation without MFA",
      "variant": "reference: the authors' code; paper: Eq. 3-4 as printed"}
  settings_min: ClassVar[dict[str, int]] = {"num_stages": 0}

  @nn.compact
  def __call__(self, f_v: jax.Array, f_a: jax.Array, *, train: bool = False,
               example_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    del train, example_ids  # the fusion part's interface (DSF3N); MFA has no dropout
    if not is_int(self.num_stages) or self.num_stages < 0:
      raise ValueError(f"num_stages: expected MFA applications >= 0 (0: no MFA), got "
                       f"{self.num_stages!r}")
    if self.num_stages == 0:
      return f_v, f_a
    mfa = MultiModalFusionAttention(self.variant, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="mfa")
    i_v, i_a = f_v, f_a
    for _ in range(self.num_stages):
      m = mfa(i_v, i_a)
      i_v, i_a = m * f_v, m * f_a
    return i_v, i_a
