"""Datasets: validation of paired-feature files, the synthetic generator, TFDS builders.

The TFDS builders live in ``dsf3n_jax.datasets.builders`` (imported on demand,
it registers ``vegas``, ``ave``, ``paired_features`` and ``synthetic``).
"""

from dsf3n_jax.datasets.synthetic import generate_synthetic
from dsf3n_jax.datasets.validation import (
    DataValidationError,
    read_paired_file,
    validate_arrays,
)

__all__ = ["DataValidationError", "generate_synthetic", "read_paired_file", "validate_arrays"]
