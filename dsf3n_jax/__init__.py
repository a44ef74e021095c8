"""dsf3n_jax: DSF3N for audio-visual cross-modal retrieval in JAX/Flax."""

__version__ = "0.1.0"
