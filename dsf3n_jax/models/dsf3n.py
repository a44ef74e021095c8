"""DSF3N: encoders, fine-grained nets, two-stage MFA fusion, shared head, classifiers.

The fusion, the head and the classifiers are parts chosen by name (or given as
modules); the stock ones and the models ``"dsf3n"`` / ``"dsf3n_paper"`` are
registered here (``dsf3n_jax.models.registry``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import FrozenDict

from dsf3n_jax.config_schema import is_int
from dsf3n_jax.mesh import pmean
from dsf3n_jax.models import registry
from dsf3n_jax.models.encoder import ModalityEncoder
from dsf3n_jax.models.fine_grained import FineGrainedNet
from dsf3n_jax.models.fusion import TwoStageFusion
from dsf3n_jax.models.heads import Classifier, OutputHead
from dsf3n_jax.models.layers import example_keys
from dsf3n_jax.models.registry import ModuleDef

MissingPartner = Literal["self", "learned", "mean"]
MISSING_PARTNERS = ("self", "learned", "mean")


class DSF3NOutput(NamedTuple):
  """What ``DSF3N`` returns, in the original's order."""

  emb_visual: jax.Array
  emb_audio: jax.Array
  logits_visual: jax.Array
  logits_audio: jax.Array


@registry.register_model("dsf3n")
class DSF3N(nn.Module):
  """The whole model: ``(visual, audio) -> (O_v, O_a, logits_v, logits_a)``.

  The fusion mixes the two modalities of a pair, so ``__call__`` embeds each
  item with its partner (the paper's protocol). ``embed_visual`` and
  ``embed_audio`` embed one modality alone (the deployable protocol): the
  partner the fusion needs is replaced by ``missing_partner``:

  * ``"self"``: the modality itself (``MFA(F_v, F_v)``); no extra variables.
  * ``"learned"``: a learned (tokens, dim) placeholder per modality, params
    ``placeholder_visual`` / ``placeholder_audio``, initialised to zeros.
  * ``"mean"``: the running mean of the partner's fine-grained tokens,
    ``batch_stats`` ``token_mean_visual`` / ``token_mean_audio``, kept with
    the BatchNorm momentum (the batch mean in train mode), zeros at init.

  BatchNorm state lives in the ``batch_stats`` collection (mutable in train
  mode); dropout draws from the ``dropout`` rng.

  Parts. ``fusion``, ``head`` and ``classifier`` are each a registered name
  (``registry.register_fusion`` etc.) or a ``ModuleDef`` (a Module class or a
  ``functools.partial`` of one). The defaults are the stock parts, the
  original model. Each is constructed and called as follows (``train``: train
  mode; ``example_ids``: (batch,) global example indices or None):

  Each is built with its settings, ``fusion_kw`` / ``head_kw`` /
  ``classifier_kw`` (the part's own dataclass fields: ``registry.part_settings``;
  MFA's ``num_stages`` and ``variant``, the head's and classifiers' ``hidden``),
  and with ``dropout_rate`` when it has that field, plus:

  * ``fusion(dtype=, param_dtype=)``, variables under ``fusion``; called as
    ``fusion(f_v, f_a, *, train, example_ids) -> (m_v, m_a)`` with visual and
    audio tokens of shape (batch, tokens, dim), returning the same shapes. It
    runs on the pairs and, for one modality embedded alone, with the
    ``missing_partner`` stand-in as the other input (its other output unused).
  * ``head(features=embed_dim, dtype=, param_dtype=)``, under ``head``, shared
    by both modalities: ``head(m, *, train, example_ids) -> (batch, embed_dim)``.
  * ``classifier(num_classes=, dtype=, param_dtype=)``, one per modality under
    ``visual_classifier`` / ``audio_classifier``:
    ``classifier(o, *, train, example_ids) -> (batch, num_classes)``.

  A part may hold ``params`` and ``batch_stats`` (the only collections the
  train step keeps). Dropout must draw from the ``dropout`` rng and should
  make its masks a function of ``example_ids`` (``layers.Dropout`` does), so
  that an update does not depend on the device count. A part with an
  ``axis_name`` field gets the model's (for a BatchNorm synchronised over
  devices), one with ``dropout_rate`` the model's rate; a part needing other
  settings of the model is registered as a factory ``model -> ModuleDef``. The stock parts
  are fusion ``"mfa"`` (``TwoStageFusion``; ``num_stages=0`` is the ablation
  without MFA), head ``"mlp"`` (``OutputHead``) and classifier ``"mlp"``
  (``Classifier``).

  Attributes:
    num_classes: number of classes of the classifiers.
    visual_dim, audio_dim: input sizes (1024, 128); checked against the input.
    encoder_features: width of both encoders, the fine-grained nets' signal
      length (1024).
    kernel_sizes: one fine-grained branch (and token) per kernel size.
    stem_features, stem_kernel, stem_stride, stem_padding: the stem conv.
    branch_features: channels per branch stage; the last is the token dim.
    fusion: the fusion part, a name or ModuleDef ("mfa", the paper's MFA).
    fusion_kw: the fusion's settings ("mfa": ``num_stages``, 2, MFA
      applications sharing one set of weights, 0 the ablation without MFA;
      ``variant``, "reference" (the code) or "paper" (Eq. 3-4 as printed)).
    head: the shared output head, a name or ModuleDef ("mlp").
    head_kw: the head's settings ("mlp": ``hidden``, 512).
    classifier: the classifiers' part, a name or ModuleDef ("mlp").
    classifier_kw: the classifiers' settings ("mlp": ``hidden``, 32).
    embed_dim: retrieval embedding size (64), the head's ``features``.
    dropout_rate: dropout of every part with a ``dropout_rate`` field (the
      stock head and classifiers; 0.5; 0 disables).
    missing_partner: what stands in for the absent modality when one
      modality is embedded alone: "self", "learned" or "mean".
    partner_dropout: in train mode, the probability that an example's
      embedding of each modality is computed with ``missing_partner`` in place
      of its partner (per example and modality, drawn from the ``dropout``
      rng keyed by the example's global index; 0 = the original).
    input_noise: in train mode, the standard deviation of Gaussian noise added
      to every input feature (features are standardised; per example, drawn
      from the ``dropout`` rng keyed by the example's global index; 0 = the
      original). A regulariser for each modality's path alone.
    bn_momentum, bn_epsilon: BatchNorm settings (Flax momentum convention).
    axis_name: mapped axis over which BatchNorm statistics are synchronised.
    dtype: computation dtype (None: that of inputs and parameters).
    param_dtype: parameter dtype.
  """

  # A part's setting defaults to the part's own default: each value is written once.
  num_classes: int
  visual_dim: int = 1024
  audio_dim: int = 128
  encoder_features: int = 1024
  kernel_sizes: Sequence[int] = FineGrainedNet.kernel_sizes
  stem_features: int = FineGrainedNet.stem_features
  stem_kernel: int = FineGrainedNet.stem_kernel
  stem_stride: int = FineGrainedNet.stem_stride
  stem_padding: int = FineGrainedNet.stem_padding
  branch_features: Sequence[int] = FineGrainedNet.branch_features
  fusion: str | ModuleDef = "mfa"
  fusion_kw: Mapping[str, Any] = FrozenDict()
  head: str | ModuleDef = "mlp"
  head_kw: Mapping[str, Any] = FrozenDict()
  classifier: str | ModuleDef = "mlp"
  classifier_kw: Mapping[str, Any] = FrozenDict()
  embed_dim: int = OutputHead.features
  dropout_rate: float = OutputHead.dropout_rate
  missing_partner: MissingPartner = "self"
  partner_dropout: float = 0.0
  input_noise: float = 0.0
  bn_momentum: float = FineGrainedNet.bn_momentum
  bn_epsilon: float = FineGrainedNet.bn_epsilon
  axis_name: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def setup(self):
    if not is_int(self.num_classes) or self.num_classes < 1:
      raise ValueError(f"num_classes: expected a positive int, got {self.num_classes!r}")
    if self.missing_partner not in MISSING_PARTNERS:
      raise ValueError(f"missing_partner: expected one of {', '.join(MISSING_PARTNERS)}, got "
                       f"{self.missing_partner!r}")
    if not self.input_noise >= 0.0:
      raise ValueError(f"input_noise: expected a standard deviation >= 0, got "
                       f"{self.input_noise!r}")
    if not 0.0 <= self.partner_dropout <= 1.0:
      raise ValueError(f"partner_dropout: expected a probability in [0, 1], got "
                       f"{self.partner_dropout!r}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.visual_encoder = ModalityEncoder(self.encoder_features, **kw)
    self.audio_encoder = ModalityEncoder(self.encoder_features, **kw)
    self.visual_fine_grained = self._fine_grained()
    self.audio_fine_grained = self._fine_grained()
    # The fields are named fusion and head, so the submodules get those names explicitly.
    self.fusion_module = registry.resolve_part("fusion", self.fusion, self)(**kw, name="fusion")
    self.head_module = registry.resolve_part("head", self.head, self)(
        features=self.embed_dim, **kw, name="head")
    classifier = registry.resolve_part("classifier", self.classifier, self)
    self.visual_classifier = classifier(num_classes=self.num_classes, **kw)
    self.audio_classifier = classifier(num_classes=self.num_classes, **kw)
    shape = (len(self.kernel_sizes), self.branch_features[-1])
    if self.missing_partner == "learned":
      self.placeholder_visual = self.param("placeholder_visual", nn.initializers.zeros, shape,
                                           self.param_dtype)
      self.placeholder_audio = self.param("placeholder_audio", nn.initializers.zeros, shape,
                                          self.param_dtype)
    elif self.missing_partner == "mean":
      # Running means in at least float32, as BatchNorm keeps its statistics: a 0.9-momentum
      # average in bfloat16 stops moving.
      stat_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
      self.token_mean_visual = self.variable("batch_stats", "token_mean_visual", jnp.zeros,
                                             shape, stat_dtype)
      self.token_mean_audio = self.variable("batch_stats", "token_mean_audio", jnp.zeros,
                                            shape, stat_dtype)

  def _fine_grained(self) -> FineGrainedNet:
    """A FineGrainedNet of this model's fields of the same names."""
    kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(FineGrainedNet)
          if f.name not in ("parent", "name") and hasattr(self, f.name)}
    return FineGrainedNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})

  def _check(self, name: str, x: jax.Array, dim: int) -> None:
    if x.ndim != 2 or x.shape[-1] != dim:
      raise ValueError(f"{name}: expected shape (batch, {dim}), got {x.shape}")

  def visual_tokens(self, visual: jax.Array, *, train: bool = False,
                    example_ids: jax.Array | None = None, input_noise=None) -> jax.Array:
    """Encoder and fine-grained net: (batch, visual_dim) -> (batch, tokens, dim)."""
    self._check("visual", visual, self.visual_dim)
    visual = self._noisy(visual, 0, train=train, example_ids=example_ids, scale=input_noise)
    return self.visual_fine_grained(self.visual_encoder(visual), train=train)

  def audio_tokens(self, audio: jax.Array, *, train: bool = False,
                   example_ids: jax.Array | None = None, input_noise=None) -> jax.Array:
    """Encoder and fine-grained net: (batch, audio_dim) -> (batch, tokens, dim)."""
    self._check("audio", audio, self.audio_dim)
    audio = self._noisy(audio, 1, train=train, example_ids=example_ids, scale=input_noise)
    return self.audio_fine_grained(self.audio_encoder(audio), train=train)

  def _noisy(self, x: jax.Array, salt: int, *, train: bool, example_ids: jax.Array | None,
             scale=None) -> jax.Array:
    """``x`` plus ``input_noise`` (or ``scale``, a traced rate) times standard normal noise
    in train mode; each example's draw keyed by its global index."""
    if not train or self.input_noise <= 0 or self.is_initializing():
      return x
    ids = jnp.arange(x.shape[0]) if example_ids is None else example_ids
    keys = example_keys(jax.random.fold_in(self.make_rng("dropout"), 2 + salt), ids)
    noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(keys)
    return x + (self.input_noise if scale is None else scale) * noise

  def _fuse(self, f_v: jax.Array, f_a: jax.Array, *, train: bool,
            example_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    m_v, m_a = self.fusion_module(f_v, f_a, train=train, example_ids=example_ids)
    if m_v.shape != f_v.shape or m_a.shape != f_a.shape:
      raise ValueError(f"fusion {self.fusion!r}: expected outputs of the input shapes "
                       f"{f_v.shape} and {f_a.shape}, got {m_v.shape} and {m_a.shape}")
    return m_v, m_a

  def _embed(self, fused: jax.Array, *, train: bool, example_ids: jax.Array | None) -> jax.Array:
    out = self.head_module(fused, train=train, example_ids=example_ids)
    if out.shape != (fused.shape[0], self.embed_dim):
      raise ValueError(f"head {self.head!r}: expected an output of shape "
                       f"({fused.shape[0]}, {self.embed_dim}), got {out.shape}")
    return out

  def _stand_in(self, present: jax.Array, missing: str, *, partner: jax.Array | None = None,
                train: bool = False) -> jax.Array:
    """Tokens standing in for the ``missing`` modality ("visual" or "audio").

    ``partner``: the real tokens of the missing modality, when known (train
    mode); "mean" then uses and tracks their batch mean.
    """
    if self.missing_partner == "self":
      return present
    if self.missing_partner == "learned":
      placeholder = getattr(self, f"placeholder_{missing}")
      return jnp.broadcast_to(placeholder.astype(present.dtype), present.shape)
    stat = getattr(self, f"token_mean_{missing}")
    if train and partner is not None:
      mean = jnp.mean(jax.lax.stop_gradient(partner), axis=0)
      mean = pmean(mean, self.axis_name)
      if not self.is_initializing():
        stat.value = (self.bn_momentum * stat.value
                      + (1 - self.bn_momentum) * mean.astype(stat.value.dtype))
    else:
      mean = stat.value
    return jnp.broadcast_to(mean.astype(present.dtype), present.shape)

  def embed_visual(self, visual: jax.Array, *, train: bool = False,
                   example_ids: jax.Array | None = None) -> jax.Array:
    """The retrieval embedding of visual items alone: (batch, visual_dim) -> (batch, embed)."""
    f_v = self.visual_tokens(visual, train=train, example_ids=example_ids)
    fused, _ = self._fuse(f_v, self._stand_in(f_v, "audio"), train=train,
                          example_ids=example_ids)
    return self._embed(fused, train=train, example_ids=example_ids)

  def embed_audio(self, audio: jax.Array, *, train: bool = False,
                  example_ids: jax.Array | None = None) -> jax.Array:
    """The retrieval embedding of audio items alone: (batch, audio_dim) -> (batch, embed)."""
    f_a = self.audio_tokens(audio, train=train, example_ids=example_ids)
    _, fused = self._fuse(self._stand_in(f_a, "visual"), f_a, train=train,
                          example_ids=example_ids)
    return self._embed(fused, train=train, example_ids=example_ids)

  def _outputs(self, m_v, m_a, *, train, example_ids) -> DSF3NOutput:
    # Call order as in the original: visual head, audio head, visual classifier, audio one.
    o_v = self._embed(m_v, train=train, example_ids=example_ids)
    o_a = self._embed(m_a, train=train, example_ids=example_ids)
    logits_v = self.visual_classifier(o_v, train=train, example_ids=example_ids)
    logits_a = self.audio_classifier(o_a, train=train, example_ids=example_ids)
    for logits in (logits_v, logits_a):
      if logits.shape != (o_v.shape[0], self.num_classes):
        raise ValueError(f"classifier {self.classifier!r}: expected logits of shape "
                         f"({o_v.shape[0]}, {self.num_classes}) (num_classes), got "
                         f"{logits.shape}")
    return DSF3NOutput(o_v, o_a, logits_v, logits_a)

  def _drop_partner(self, paired: jax.Array, alone: jax.Array, example_ids: jax.Array,
                    salt: int, rate) -> jax.Array:
    """Per example, ``alone`` with probability ``rate``, else ``paired``."""
    key = jax.random.fold_in(self.make_rng("dropout"), salt)
    keys = example_keys(key, example_ids)
    drop = jax.vmap(lambda k: jax.random.bernoulli(k, rate))(keys)
    return jnp.where(drop.reshape(-1, *([1] * (paired.ndim - 1))), alone, paired)

  def __call__(self, visual: jax.Array, audio: jax.Array, *, train: bool = False,
               example_ids: jax.Array | None = None, unimodal: bool = False,
               partner_dropout: float | jax.Array | None = None,
               input_noise: float | jax.Array | None = None, teacher: bool = False):
    """Runs the model on pairs.

    Args:
      visual: (batch, visual_dim) visual features.
      audio: (batch, audio_dim) audio features.
      train: batch statistics and dropout if True; running statistics if False.
      example_ids: (batch,) global indices of the examples; dropout masks are a
        function of them (default: positions in the batch).
      unimodal: also return the outputs of each modality embedded alone.
      partner_dropout: the rate in place of the field's (a traced array in a
        sweep, ``dsf3n_jax.sweep``); whether partners are dropped at all is the
        field's ``partner_dropout > 0``.
      input_noise: likewise, the noise's scale in place of the field's.
      teacher: with ``unimodal``, also return the paired outputs with every
      modality's real partner (what distillation terms learn from: in train mode
      with partner dropout, ``paired`` has the stand-in for some examples).

    Returns:
      ``DSF3NOutput(emb_visual, emb_audio, logits_visual, logits_audio)`` of
      the pairs; with ``unimodal``, ``(paired, alone)``, two ``DSF3NOutput``;
      with ``teacher`` too, ``(paired, alone, teacher)``.
      In train mode with ``partner_dropout > 0`` the paired outputs have each
      modality's fusion see the stand-in for a random subset of the examples.
    """
    if visual.shape[0] != audio.shape[0]:
      raise ValueError(f"visual and audio batch sizes differ: {visual.shape[0]} vs "
                       f"{audio.shape[0]}")
    tokens = dict(train=train, example_ids=example_ids, input_noise=input_noise)
    f_v = self.visual_tokens(visual, **tokens)
    f_a = self.audio_tokens(audio, **tokens)
    fuse = functools.partial(self._fuse, train=train, example_ids=example_ids)
    m_v, m_a = fuse(f_v, f_a)
    with_partner = (m_v, m_a)
    need_alone = unimodal or (train and self.partner_dropout > 0)
    if need_alone or (train and self.missing_partner == "mean"):  # "mean" tracks in training
      s_a = self._stand_in(f_v, "audio", partner=f_a, train=train)
      s_v = self._stand_in(f_a, "visual", partner=f_v, train=train)
    if need_alone:
      alone_v, _ = fuse(f_v, s_a)
      _, alone_a = fuse(s_v, f_a)
    if train and self.partner_dropout > 0:
      ids = jnp.arange(visual.shape[0]) if example_ids is None else example_ids
      rate = self.partner_dropout if partner_dropout is None else partner_dropout
      m_v = self._drop_partner(m_v, alone_v, ids, 0, rate)
      m_a = self._drop_partner(m_a, alone_a, ids, 1, rate)
    paired = self._outputs(m_v, m_a, train=train, example_ids=example_ids)
    if not unimodal:
      return paired
    alone = self._outputs(alone_v, alone_a, train=train, example_ids=example_ids)
    if not teacher:
      return paired, alone
    # Last, so that every other output draws the dropout masks it draws without a teacher.
    return paired, alone, (self._outputs(*with_partner, train=train, example_ids=example_ids)
                           if train and self.partner_dropout > 0 else paired)


# The stock parts, exactly the original's modules: two-stage MFA (paper Eq. 3-5), the shared
# output layer and the per-modality classifier.
registry.register_fusion("mfa")(TwoStageFusion)
registry.register_head("mlp")(OutputHead)
registry.register_classifier("mlp")(Classifier)

# Eq. 3-4 as printed instead of as the original code computes them. A config's
# model.fusion_kw is merged into the preset's (training.state.model_config); a fusion_kw
# passed in Python replaces it, so it must hold variant="paper" itself.
DSF3N_PAPER = registry.register_model("dsf3n_paper")(
    functools.partial(DSF3N, fusion_kw=FrozenDict(variant="paper")))

# Fields of models saved before the parts had their own settings: (field, part kind, setting).
_LEGACY_FIELDS = (("num_fusion_stages", "fusion", "num_stages"),
                  ("mfa_variant", "fusion", "variant"),
                  ("head_hidden", "head", "hidden"),
                  ("classifier_hidden", "classifier", "hidden"))


def upgrade_fields(kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """A saved model config with the fields of older versions moved into the part settings.

  ``num_fusion_stages``, ``mfa_variant`` and ``use_mfa`` become ``fusion_kw``'s
  ``num_stages`` and ``variant`` (``use_mfa=False``: ``num_stages=0``),
  ``head_hidden`` and ``classifier_hidden`` the ``hidden`` of ``head_kw`` and
  ``classifier_kw``; a config without them is returned as it is.
  """
  out = dict(kwargs)
  use_mfa = out.pop("use_mfa", True)
  for old, kind, new in _LEGACY_FIELDS:
    if old in out:
      value = out.pop(old)
      out[f"{kind}_kw"] = {**dict(out.get(f"{kind}_kw") or {}), new: value}
  if not use_mfa:
    out["fusion_kw"] = {**dict(out.get("fusion_kw") or {}), "num_stages": 0}
  return out


def resolved_fields(kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """A model config as saved: older fields upgraded (``upgrade_fields``) and the settings
  of each part given by name complete, with its defaults, as a plain dict in key order."""
  out = upgrade_fields(kwargs)
  defaults = {f.name: f.default for f in dataclasses.fields(DSF3N)}
  for kind in registry.PARTS:
    kw = dict(out.get(f"{kind}_kw") or {})
    part = out.get(kind, defaults[kind])
    settings = registry.part_settings(kind, part) if isinstance(part, str) else None
    for key, value in (settings or {}).items():
      if value is not dataclasses.MISSING:
        kw.setdefault(key, value)
    out[f"{kind}_kw"] = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(kw.items())}
  return out
