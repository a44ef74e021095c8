"""The split-digits paired set (benchmarks/split_digits.py): two views of each real image."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from benchmarks import split_digits
from dsf3n_jax.datasets import files, validation


def test_each_pair_is_the_two_halves_of_one_image_split_within_each_class(tmp_path):
  arrays = split_digits.split_digits()
  digits = load_digits()
  images = digits.images.reshape(len(digits.images), -1) / 16.0
  sizes = {split: len(arrays[f"lab_{split}"]) for split in ("train", "test")}
  assert sizes == {"train": 1437, "test": 360}
  seen = []
  for split in ("train", "test"):
    visual, audio = arrays[f"visual_{split}"], arrays[f"audio_{split}"]
    assert visual.shape == audio.shape == (sizes[split], 32)
    whole = np.concatenate([visual.reshape(-1, 8, 4), audio.reshape(-1, 8, 4)], axis=2)
    # Every row is one bundled image (its two halves side by side) with that image's label.
    match = (np.abs(whole.reshape(len(whole), 1, 64) - images[None]).max(-1) < 1e-6)
    assert (match.sum(1) >= 1).all()
    rows = match.argmax(1)
    assert (digits.target[rows] == arrays[f"lab_{split}"]).all()
    seen.append(rows)
  assert len(np.intersect1d(*seen)) == 0  # no image in both splits
  test_share = np.bincount(arrays["lab_test"]) / np.bincount(digits.target)
  assert np.allclose(test_share, 0.2, atol=0.02)
  assert all(np.array_equal(v, split_digits.split_digits()[k]) for k, v in arrays.items())

  path = split_digits.write(tmp_path / "sub" / "split_digits.npz", arrays)
  read = validation.validate_arrays(files.read_paired_file(path), source=str(path))
  assert read["visual_train"].shape == (1437, 32) and read["lab_test"].max() == 9
  assert [p.name for p in path.parent.iterdir()] == ["split_digits.npz"]  # no temporary left


def test_the_output_must_be_an_npz_file(tmp_path):
  with pytest.raises(SystemExit, match=r"--out=.*split_digits\.h5: expected a file name ending"):
    split_digits.main(["--out", str(tmp_path / "split_digits.h5")])
