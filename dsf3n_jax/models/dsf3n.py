"""DSF3N: encoders, fine-grained nets, two-stage MFA fusion, shared head, classifiers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsf3n_jax.models.encoder import ModalityEncoder
from dsf3n_jax.models.fine_grained import FineGrainedNet
from dsf3n_jax.models.fusion import TwoStageFusion, Variant
from dsf3n_jax.models.heads import Classifier, OutputHead


class DSF3NOutput(NamedTuple):
  """What ``DSF3N`` returns, in the original's order."""

  emb_visual: jax.Array
  emb_audio: jax.Array
  logits_visual: jax.Array
  logits_audio: jax.Array


class DSF3N(nn.Module):
  """The whole model: ``(visual, audio) -> (O_v, O_a, logits_v, logits_a)``.

  BatchNorm state lives in the ``batch_stats`` collection (mutable in train
  mode); dropout draws from the ``dropout`` rng.

  Attributes:
    num_classes: number of classes of the classifiers.
    visual_dim, audio_dim: input sizes (1024, 128); checked against the input.
    encoder_features: width of both encoders, the fine-grained nets' signal
      length (1024).
    kernel_sizes: one fine-grained branch (and token) per kernel size.
    stem_features, stem_kernel, stem_stride, stem_padding: the stem conv.
    branch_features: channels per branch stage; the last is the token dim.
    num_fusion_stages: MFA applications sharing one set of weights (2).
    mfa_variant: "reference" (the code) or "paper" (Eq. 3-4 as printed).
    use_mfa: False is the ablation without MFA (fused = fine-grained).
    head_hidden: hidden width of the shared output head (512).
    embed_dim: retrieval embedding size (64).
    classifier_hidden: hidden width of the classifiers (32).
    dropout_rate: dropout in the head and classifiers (0.5; 0 disables).
    bn_momentum, bn_epsilon: BatchNorm settings (Flax momentum convention).
    axis_name: mapped axis over which BatchNorm statistics are synchronised.
    dtype: computation dtype (None: that of inputs and parameters).
    param_dtype: parameter dtype.
  """

  num_classes: int
  visual_dim: int = 1024
  audio_dim: int = 128
  encoder_features: int = 1024
  kernel_sizes: Sequence[int] = (3, 5, 7)
  stem_features: int = 64
  stem_kernel: int = 32
  stem_stride: int = 8
  stem_padding: int = 12
  branch_features: Sequence[int] = (64, 128, 256)
  num_fusion_stages: int = 2
  mfa_variant: Variant = "reference"
  use_mfa: bool = True
  head_hidden: int = 512
  embed_dim: int = 64
  classifier_hidden: int = 32
  dropout_rate: float = 0.5
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _fine_grained(self, name: str) -> FineGrainedNet:
    return FineGrainedNet(
        kernel_sizes=tuple(self.kernel_sizes), stem_features=self.stem_features,
        stem_kernel=self.stem_kernel, stem_stride=self.stem_stride,
        stem_padding=self.stem_padding, branch_features=tuple(self.branch_features),
        bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, axis_name=self.axis_name,
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, visual: jax.Array, audio: jax.Array, *, train: bool = False,
               example_ids: jax.Array | None = None) -> DSF3NOutput:
    """Runs the model.

    Args:
      visual: (batch, visual_dim) visual features.
      audio: (batch, audio_dim) audio features.
      train: batch statistics and dropout if True; running statistics if False.
      example_ids: (batch,) global indices of the examples; dropout masks are a
        function of them (default: positions in the batch).

    Returns:
      ``DSF3NOutput(emb_visual, emb_audio, logits_visual, logits_audio)``.
    """
    for name, x, dim in (("visual", visual, self.visual_dim), ("audio", audio, self.audio_dim)):
      if x.ndim != 2 or x.shape[-1] != dim:
        raise ValueError(f"{name}: expected shape (batch, {dim}), got {x.shape}")
    if visual.shape[0] != audio.shape[0]:
      raise ValueError(f"visual and audio batch sizes differ: {visual.shape[0]} vs "
                       f"{audio.shape[0]}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h_v = ModalityEncoder(self.encoder_features, **kw, name="visual_encoder")(visual)
    h_a = ModalityEncoder(self.encoder_features, **kw, name="audio_encoder")(audio)
    f_v = self._fine_grained("visual_fine_grained")(h_v, train=train)
    f_a = self._fine_grained("audio_fine_grained")(h_a, train=train)
    stages = self.num_fusion_stages if self.use_mfa else 0
    f_v, f_a = TwoStageFusion(stages, self.mfa_variant, **kw, name="fusion")(f_v, f_a)
    head = OutputHead(self.head_hidden, self.embed_dim, self.dropout_rate, **kw, name="head")
    # Call order as in the original: visual head, audio head, visual classifier, audio one.
    o_v = head(f_v, train=train, example_ids=example_ids)
    o_a = head(f_a, train=train, example_ids=example_ids)
    logits_v = Classifier(self.num_classes, self.classifier_hidden, self.dropout_rate, **kw,
                          name="visual_classifier")(o_v, train=train, example_ids=example_ids)
    logits_a = Classifier(self.num_classes, self.classifier_hidden, self.dropout_rate, **kw,
                          name="audio_classifier")(o_a, train=train, example_ids=example_ids)
    return DSF3NOutput(o_v, o_a, logits_v, logits_a)
