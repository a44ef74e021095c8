"""DSF3N model: one module per idea of the paper."""

from dsf3n_jax.models.dsf3n import DSF3N, DSF3NOutput
from dsf3n_jax.models.encoder import ModalityEncoder
from dsf3n_jax.models.fine_grained import FineGrainedNet
from dsf3n_jax.models.fusion import MultiModalFusionAttention, TwoStageFusion
from dsf3n_jax.models.heads import Classifier, OutputHead
from dsf3n_jax.models.layers import BatchNorm, Bilinear, Dropout

__all__ = [
    "DSF3N", "DSF3NOutput", "ModalityEncoder", "FineGrainedNet", "MultiModalFusionAttention",
    "TwoStageFusion", "OutputHead", "Classifier", "BatchNorm", "Bilinear", "Dropout",
]
