"""A second real paired set, assembled from a package: each handwritten digit split in two views.

  python -m benchmarks.split_digits --out DIR/split_digits.npz
  python -m benchmarks.paper --data=DIR/split_digits.npz --seeds=3 \
      --only=swept_recipe,semantic_mlp --no_figures --out=DIR

The split-image task of the multi-view literature (deep CCA's "split MNIST"), on
scikit-learn's bundled copy of the UCI optdigits images (1,797 8x8 images, 10 classes,
BSD-3; nothing is downloaded): the left half of each image (8 rows x 4 columns, 32
features) is one modality (``visual_*``), its right half the other (``audio_*``), paired by
instance; relevance is class-level, as in the mAP protocol. The images are split 80/20
within each class with a fixed seed (1,437 train, 360 test) and scaled to [0, 1].

It is data the default sweep (``dsf3n_jax.sweep.DEFAULT_SWEEP``) was not chosen on: the
search space was chosen on fsdd_digits and synthetic (docs/evaluation.md, "Sweeps"). Note
that fsdd_digits' visual side is the same image collection, whole and upsampled, beside
spoken digits; here both sides are half images.
"""

from __future__ import annotations

import argparse
import os
import pathlib

import numpy as np

from dsf3n_jax import paths

SEED = 0  # of the stratified split
TEST_FRACTION = 0.2


def split_digits(seed: int = SEED, test_fraction: float = TEST_FRACTION) -> dict[str, np.ndarray]:
  """The six arrays of a paired-feature file (docs/data.md): left halves visual, right audio."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  digits = load_digits()
  # optdigits' pixels count 0..16.
  images, labels = (digits.images / 16.0).astype(np.float32), digits.target
  train, test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                 random_state=seed, stratify=labels)
  out = {}
  for split, rows in (("train", np.sort(train)), ("test", np.sort(test))):
    out[f"visual_{split}"] = images[rows, :, :4].reshape(len(rows), -1)
    out[f"audio_{split}"] = images[rows, :, 4:].reshape(len(rows), -1)
    out[f"lab_{split}"] = labels[rows].astype(np.int64)
  return out


def write(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> pathlib.Path:
  """Writes ``arrays`` to the .npz ``path``, whole or not at all."""
  path = pathlib.Path(path)
  if path.suffix != ".npz":
    raise SystemExit(f"--out={path}: expected a file name ending in .npz")
  path.parent.mkdir(parents=True, exist_ok=True)
  return pathlib.Path(paths.atomic_savez(path, arrays))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="the .npz file to write")
  args = parser.parse_args(argv)
  arrays = split_digits()
  path = write(args.out, arrays)
  print(f"{path}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
  main()
