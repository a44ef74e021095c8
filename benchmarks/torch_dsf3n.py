"""PyTorch baseline of DSF3N: the original's network and losses, with its module and key names.

The authors' ``v_a_model.CrossModal_NN`` saves state dicts with keys such as
``visual_layer.visual_encoder.weight``, ``visual_fine_grained_feature.conv3_1.weight``,
``MmFA.joint_attention_map.weight``, ``out_layer.0.weight`` and
``classifier_visual.classifier.3.weight``. ``CrossModalNN`` below has exactly
those names (its class is also exported as ``CrossModal_NN``), so the
original's checkpoints load into it with ``load_state_dict`` and it computes
the same numbers. It is the baseline of the benchmarks and the second
implementation of the parity tests; it needs ``torch`` (the ``bench`` or
``test`` extra), which the ``dsf3n_jax`` package itself never imports.

The losses of the reference ``train_model.py`` are here too: ``CenterLoss``
(centres as a parameter named ``center``, as in the original), ``id_loss``
(cross-entropy of both modalities), ``pair_distance`` and ``total_loss``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ImgNN", "AudioNN", "MultiScale_Modal_Net", "Multi_modal_Fusion_Attention", "Classifier",
    "CrossModalNN", "CrossModal_NN", "CenterLoss", "id_loss", "pair_distance", "total_loss",
]


class ImgNN(nn.Module):
  """Visual encoder: ``relu(visual_encoder(x))``."""

  def __init__(self, input_dim: int = 1024, output_dim: int = 1024):
    super().__init__()
    self.visual_encoder = nn.Linear(input_dim, output_dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.relu(self.visual_encoder(x))


class AudioNN(nn.Module):
  """Audio encoder: ``relu(audio_encoder(x))``."""

  def __init__(self, input_dim: int = 128, output_dim: int = 1024):
    super().__init__()
    self.audio_encoder = nn.Linear(input_dim, output_dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.relu(self.audio_encoder(x))


class MultiScale_Modal_Net(nn.Module):  # noqa: N801 (the original's name)
  """The fine-grained net: (B, L) -> (B, len(kernel_sizes), branch_features[-1]).

  BatchNorm over one channel, stem ``conv1`` + ``pool1``, one branch per kernel
  size ``k`` of convolutions ``conv{k}_{i}`` each followed by a max pool
  ``pool{k}_{i}``, then the global max pool ``pool2``. No activations.
  """

  def __init__(self, num_features: int = 1, *, kernel_sizes: Sequence[int] = (3, 5, 7),
               stem_features: int = 64, stem_kernel: int = 32, stem_stride: int = 8,
               stem_padding: int = 12, branch_features: Sequence[int] = (64, 128, 256)):
    super().__init__()
    self.kernel_sizes = tuple(kernel_sizes)
    self.num_stages = len(branch_features)
    self.BN = nn.BatchNorm1d(num_features=num_features)  # noqa: N815 (the original's name)
    self.conv1 = nn.Conv1d(num_features, stem_features, kernel_size=stem_kernel,
                           stride=stem_stride, padding=stem_padding)
    self.pool1 = nn.MaxPool1d(kernel_size=2, stride=2)
    for k in self.kernel_sizes:
      in_features = stem_features
      for i, features in enumerate(branch_features, start=1):
        setattr(self, f"conv{k}_{i}", nn.Conv1d(in_features, features, kernel_size=k, stride=1,
                                                padding=(k - 1) // 2))
        setattr(self, f"pool{k}_{i}", nn.MaxPool1d(kernel_size=2, stride=2))
        in_features = features
    self.pool2 = nn.AdaptiveMaxPool1d(1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x.view(x.size(0), 1, -1)
    x = self.pool1(self.conv1(self.BN(x)))
    tokens = []
    for k in self.kernel_sizes:
      y = x
      for i in range(1, self.num_stages + 1):
        y = getattr(self, f"pool{k}_{i}")(getattr(self, f"conv{k}_{i}")(y))
      tokens.append(self.pool2(y).flatten(1))
    return torch.stack(tokens, dim=1)


class Multi_modal_Fusion_Attention(nn.Module):  # noqa: N801 (the original's name)
  """MFA, as the original code computes it. ``variant="paper"`` drops w_2, w_4 and t_c (Eq. 3-4
  as printed).

  ``einsum_bilinear=True`` computes the bilinear map with ``torch.einsum`` on
  the same ``joint_attention_map.weight`` instead of calling ``nn.Bilinear``.
  """

  def __init__(self, input_dim: int = 256, dim_k: int = 256, *, variant: str = "reference",
               einsum_bilinear: bool = False):
    super().__init__()
    if variant not in ("reference", "paper"):
      raise ValueError(f"variant: expected 'reference' or 'paper', got {variant!r}")
    self.variant = variant
    self.einsum_bilinear = einsum_bilinear
    names = ("q_v", "q_a", "k_v", "k_a", "w_1", "w_2", "w_3", "w_4")
    if variant == "paper":
      names = ("q_v", "q_a", "k_v", "k_a", "w_1", "w_3")
    for name in names:
      setattr(self, name, nn.Linear(input_dim, dim_k))
    self.joint_attention_map = nn.Bilinear(dim_k, dim_k, dim_k, bias=False)
    self._norm_fact = 1 / math.sqrt(dim_k)
    if variant == "reference":
      self.t_c = nn.Parameter(torch.ones([]))

  def bilinear(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    if self.einsum_bilinear:
      return torch.einsum("...i,oij,...j->...o", x, self.joint_attention_map.weight, z)
    return self.joint_attention_map(x, z)

  def forward(self, img: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    q_v, q_a = self.q_v(img), self.q_a(audio)
    k_v, k_a = self.k_v(img), self.k_a(audio)

    def attend(q, k, values):
      return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1) * self._norm_fact,
                       values)

    phi_va, phi_v = attend(q_v, k_a, audio), attend(q_v, k_v, img)
    phi_av, phi_a = attend(q_a, k_v, img), attend(q_a, k_a, audio)
    if self.variant == "reference":
      g_v = torch.sigmoid((self.w_1(phi_va) + self.w_2(phi_v)) * phi_v)
      g_a = torch.sigmoid((self.w_3(phi_av) + self.w_4(phi_a)) * phi_a)
    else:
      g_v = torch.sigmoid(self.w_1(phi_va) + phi_v) * phi_v
      g_a = torch.sigmoid(self.w_3(phi_av) + phi_a) * phi_a
    j = torch.sigmoid(self.bilinear(g_v, g_a))
    if self.variant == "reference":
      return (self.t_c * j) * img + (1 - j) * audio
    return j * img + (1 - j) * audio


class Classifier(nn.Module):
  """Linear (no bias) -> ReLU -> Dropout -> Linear (no bias), as ``classifier.{0,3}``."""

  def __init__(self, latent_dim: int = 64, out_label: int = 10, *, hidden: int = 32,
               dropout: float = 0.5):
    super().__init__()
    self.classifier = nn.Sequential(
        nn.Linear(latent_dim, hidden, bias=False), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, out_label, bias=False))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.classifier(x)


class CrossModalNN(nn.Module):
  """DSF3N in PyTorch with the original ``CrossModal_NN``'s parameter names.

  ``forward(img, audio)`` returns ``(out_visual_feature, out_audio_feature,
  visual_predict, audio_predict)``. The keyword options mirror ``DSF3N``'s
  fields (defaults are the reference model): the stock parts' settings either
  as ``DSF3N`` has them (``fusion_kw={"num_stages", "variant"}``, ``head_kw``
  and ``classifier_kw`` ``{"hidden"}``) or flat (``num_fusion_stages``,
  ``mfa_variant``, ``use_mfa``, ``head_hidden``, ``classifier_hidden``);
  ``einsum_bilinear`` switches the bilinear map from ``nn.Bilinear`` to an
  einsum (same weights).
  """

  def __init__(self, num_classes: int = 10, *, visual_dim: int = 1024, audio_dim: int = 128,
               encoder_features: int = 1024, kernel_sizes: Sequence[int] = (3, 5, 7),
               stem_features: int = 64, stem_kernel: int = 32, stem_stride: int = 8,
               stem_padding: int = 12, branch_features: Sequence[int] = (64, 128, 256),
               num_fusion_stages: int = 2, mfa_variant: str = "reference", use_mfa: bool = True,
               head_hidden: int = 512, embed_dim: int = 64, classifier_hidden: int = 32,
               dropout_rate: float = 0.5, einsum_bilinear: bool = False,
               fusion_kw: Mapping[str, Any] | None = None,
               head_kw: Mapping[str, Any] | None = None,
               classifier_kw: Mapping[str, Any] | None = None):
    super().__init__()
    fusion_kw = dict(fusion_kw or {})
    num_fusion_stages = fusion_kw.get("num_stages", num_fusion_stages)
    mfa_variant = fusion_kw.get("variant", mfa_variant)
    use_mfa = use_mfa and num_fusion_stages > 0
    head_hidden = dict(head_kw or {}).get("hidden", head_hidden)
    classifier_hidden = dict(classifier_kw or {}).get("hidden", classifier_hidden)
    dim = branch_features[-1]
    self.num_fusion_stages = num_fusion_stages if use_mfa else 0
    self.visual_layer = ImgNN(visual_dim, encoder_features)
    self.audio_layer = AudioNN(audio_dim, encoder_features)
    if use_mfa:
      self.MmFA = Multi_modal_Fusion_Attention(  # noqa: N815 (the original's name)
          dim, dim, variant=mfa_variant, einsum_bilinear=einsum_bilinear)
    fine = dict(kernel_sizes=kernel_sizes, stem_features=stem_features, stem_kernel=stem_kernel,
                stem_stride=stem_stride, stem_padding=stem_padding,
                branch_features=branch_features)
    self.visual_fine_grained_feature = MultiScale_Modal_Net(num_features=1, **fine)
    self.audio_fine_grained_feature = MultiScale_Modal_Net(num_features=1, **fine)
    self.out_layer = nn.Sequential(
        nn.Linear(len(kernel_sizes) * dim, head_hidden), nn.ReLU(), nn.Dropout(dropout_rate),
        nn.Linear(head_hidden, embed_dim))
    self.classifier_audio = Classifier(embed_dim, num_classes, hidden=classifier_hidden,
                                       dropout=dropout_rate)
    self.classifier_visual = Classifier(embed_dim, num_classes, hidden=classifier_hidden,
                                        dropout=dropout_rate)

  def forward(self, img: torch.Tensor, audio: torch.Tensor):
    batch = img.size(0)
    f_v = self.visual_fine_grained_feature(self.visual_layer(img))
    f_a = self.audio_fine_grained_feature(self.audio_layer(audio))
    i_v, i_a = f_v, f_a
    for _ in range(self.num_fusion_stages):
      m = self.MmFA(i_v, i_a)
      i_v, i_a = m * f_v, m * f_a
    out_visual_feature = self.out_layer(i_v.reshape(batch, -1))
    out_audio_feature = self.out_layer(i_a.reshape(batch, -1))
    visual_predict = self.classifier_visual(out_visual_feature)
    audio_predict = self.classifier_audio(out_audio_feature)
    return out_visual_feature, out_audio_feature, visual_predict, audio_predict


CrossModal_NN = CrossModalNN


class CenterLoss(nn.Module):
  """The reference centre loss; the centres are the parameter ``center`` (C, d).

  ``f_hat = normalize(f)``; ``1/2 sum_i ||f_hat_i - c_{y_i}||^2 / n_{y_i}``.
  """

  def __init__(self, cls_num: int, feature_num: int, *, generator: torch.Generator | None = None):
    super().__init__()
    self.cls_num = cls_num
    self.center = nn.Parameter(torch.randn(cls_num, feature_num, generator=generator))

  def forward(self, feature: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    feature = F.normalize(feature)
    target = target.long()
    centre = self.center.index_select(0, target).to(feature.dtype)
    count = torch.bincount(target, minlength=self.cls_num)[target].to(feature.dtype)
    return torch.sum(torch.sum((feature - centre) ** 2, dim=1) / count) / 2.0


def id_loss(visual_predict: torch.Tensor, audio_predict: torch.Tensor,
            labels: torch.Tensor) -> torch.Tensor:
  """``CE(logits_v, y) + CE(logits_a, y)`` (means over the batch)."""
  labels = labels.long()
  return F.cross_entropy(visual_predict, labels) + F.cross_entropy(audio_predict, labels)


def pair_distance(view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
  """The reference ``Distance_loss``: mean Euclidean distance of paired embeddings."""
  return ((view1 - view2) ** 2).sum(1).sqrt().mean()


def total_loss(outputs, labels: torch.Tensor, center_loss: CenterLoss, *, alpha: float,
               beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
  """``L = L_id + alpha L_pair + beta L_center`` as in the reference ``train_model.py``.

  Args:
    outputs: what ``CrossModalNN.forward`` returns.
    labels: (B,) integer class ids.
    center_loss: the ``CenterLoss`` module holding the centres.
    alpha: weight of the pair distance.
    beta: weight of the centre loss.

  Returns:
    ``(total, {"id", "pair", "center"})``.
  """
  emb_v, emb_a, logits_v, logits_a = outputs
  parts = {
      "id": id_loss(logits_v, logits_a, labels),
      "pair": pair_distance(emb_v, emb_a),
      "center": center_loss(emb_v, labels) + center_loss(emb_a, labels),
  }
  return parts["id"] + alpha * parts["pair"] + beta * parts["center"], parts
