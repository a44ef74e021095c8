"""DSF3N model: one module per idea of the paper."""

from dsf3n_jax.models import registry
from dsf3n_jax.models.dsf3n import DSF3N, DSF3N_PAPER, DSF3NOutput
from dsf3n_jax.models.encoder import ModalityEncoder
from dsf3n_jax.models.fine_grained import FineGrainedNet
from dsf3n_jax.models.fusion import MultiModalFusionAttention, TwoStageFusion
from dsf3n_jax.models.heads import Classifier, OutputHead
from dsf3n_jax.models.layers import BatchNorm, Bilinear, Dropout
from dsf3n_jax.models.registry import (
    register,
    register_classifier,
    register_fusion,
    register_head,
    register_model,
)

__all__ = [
    "DSF3N", "DSF3N_PAPER", "DSF3NOutput", "ModalityEncoder", "FineGrainedNet",
    "MultiModalFusionAttention", "TwoStageFusion", "OutputHead", "Classifier", "BatchNorm",
    "Bilinear", "Dropout", "registry", "register", "register_model", "register_fusion",
    "register_head", "register_classifier",
]
