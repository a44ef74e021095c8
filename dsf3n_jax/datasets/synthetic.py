"""A built-in generator of class-structured audio-visual pairs with the paper's shapes.

Each pair shares an instance latent ``z``: a class is a mixture of a few
sub-clusters ("modes") in a small latent space, so that classes are not
linearly separable there. Each modality sees ``z`` (plus its own noise and a
modality-specific nuisance latent) through its own random two-layer nonlinear
map, into 1024 (visual) or 128 (audio) dimensions. Retrieval is learnable by a
nonlinear model but a linear model (CCA, logistic regression) stays clearly
below perfect. Everything is drawn from one numpy ``Generator`` seeded by
``seed``: same arguments, same arrays.
"""

from __future__ import annotations

import inspect

import numpy as np

# Defaults: a good demo (see README); measured linear baselines are in the README.
NUM_TRAIN = 3000
NUM_TEST = 600
DIFFICULTY = 1.0


def _modality_map(rng: np.random.Generator, *, in_dim: int, out_dim: int,
                  hidden: int) -> tuple[np.ndarray, ...]:
  """Random weights of a two-layer map ``out = tanh(x W1 + b1) W2`` (fixed per dataset)."""
  w1 = rng.standard_normal((in_dim, hidden)) * (1.5 / np.sqrt(in_dim))
  b1 = rng.uniform(-np.pi, np.pi, hidden)
  w2 = rng.standard_normal((hidden, out_dim)) / np.sqrt(hidden)
  return w1, b1, w2


def _apply_map(params, x: np.ndarray) -> np.ndarray:
  w1, b1, w2 = params
  # sin keeps the map non-monotonic: a linear read-out of the features cannot undo it.
  return np.sin(x @ w1 + b1) @ w2


def generate_synthetic(*, num_train: int = NUM_TRAIN, num_test: int = NUM_TEST,
                       num_classes: int = 10, visual_dim: int = 1024, audio_dim: int = 128,
                       difficulty: float = DIFFICULTY, seed: int = 0, latent_dim: int = 16,
                       modes_per_class: int = 3, nuisance_dim: int = 8,
                       hidden: int = 256) -> dict[str, np.ndarray]:
  """Generates the six paired-feature arrays of a synthetic audio-visual retrieval dataset.

  Args:
    num_train, num_test: pairs per split (train contains every class when
      ``num_train >= num_classes``: labels cycle through the classes before
      being shuffled).
    num_classes: number of classes.
    visual_dim, audio_dim: feature sizes (1024, 128 as in the paper).
    difficulty: scales the within-class spread, the per-modality noise and the
      nuisance latents; 0 is almost separable, 1 the default, 2 hard.
    seed: the only source of randomness.
    latent_dim: size of the shared instance latent.
    modes_per_class: sub-clusters per class (>1 makes classes non-convex).
    nuisance_dim: size of each modality's private nuisance latent.
    hidden: width of the random nonlinear maps.

  Returns:
    Dict with ``visual_train`` (num_train, visual_dim) float32, ``audio_train``
    (num_train, audio_dim) float32, ``lab_train`` (num_train,) int64, and the
    same three ``*_test`` arrays.
  """
  for name, v in (("num_train", num_train), ("num_test", num_test),
                  ("num_classes", num_classes), ("visual_dim", visual_dim),
                  ("audio_dim", audio_dim), ("latent_dim", latent_dim),
                  ("modes_per_class", modes_per_class), ("hidden", hidden)):
    if int(v) < 1:
      raise ValueError(f"generate_synthetic: {name} must be >= 1, got {v}")
  if num_train < num_classes:
    raise ValueError(f"generate_synthetic: num_train={num_train} < num_classes={num_classes}; "
                     "every class must appear in train")
  if difficulty < 0:
    raise ValueError(f"generate_synthetic: difficulty must be >= 0, got {difficulty}")
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal((num_classes, modes_per_class, latent_dim)) * 1.0
  maps = {
      "visual": _modality_map(rng, in_dim=latent_dim + nuisance_dim, out_dim=visual_dim,
                              hidden=hidden),
      "audio": _modality_map(rng, in_dim=latent_dim + nuisance_dim, out_dim=audio_dim,
                             hidden=hidden),
  }
  spread = 0.45 * difficulty
  noise = {"visual": 0.3 * difficulty, "audio": 0.3 * difficulty}
  out = {}
  for split, n in (("train", num_train), ("test", num_test)):
    labels = rng.permutation(np.arange(n) % num_classes)
    modes = rng.integers(0, modes_per_class, n)
    z = centers[labels, modes] + spread * rng.standard_normal((n, latent_dim))
    for modality, params in maps.items():
      private = difficulty * rng.standard_normal((n, nuisance_dim))
      x = _apply_map(params, np.concatenate([z, private], axis=1))
      x += noise[modality] * rng.standard_normal(x.shape)
      out[f"{modality}_{split}"] = x
    out[f"lab_{split}"] = labels.astype(np.int64)
  # Standardise with train statistics, like the authors' normalised features.
  for modality in maps:
    mean = out[f"{modality}_train"].mean(0)
    std = out[f"{modality}_train"].std(0) + 1e-6
    for split in ("train", "test"):
      out[f"{modality}_{split}"] = ((out[f"{modality}_{split}"] - mean) / std).astype(np.float32)
  return out


# ``generate_synthetic``'s options (``config.data.synthetic.<name>``) and their defaults.
OPTIONS = {name: p.default for name, p in inspect.signature(generate_synthetic).parameters.items()}
