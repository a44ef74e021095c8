"""Tests of the t-SNE figure CLI (dsf3n_jax.visualize)."""

import numpy as np
import pytest

from dsf3n_jax import retrieval, visualize


def test_subsample_is_stratified():
  labels = np.repeat([0, 1, 2], [50, 30, 20])
  rows = visualize.subsample(labels, max_points=10, seed=0)
  assert np.bincount(labels[rows]).tolist() == [5, 3, 2]
  assert len(visualize.subsample(labels, max_points=500)) == 100


def test_joint_tsne_shapes_and_kinds():
  rng = np.random.default_rng(0)
  v, a = rng.normal(size=(20, 40)), rng.normal(size=(20, 7))
  xy_v, xy_a = visualize.joint_tsne(v, a, kind="raw", perplexity=5)
  assert xy_v.shape == (20, 2) and xy_a.shape == (20, 2) and np.isfinite(xy_v).all()
  with pytest.raises(ValueError, match="kind"):
    visualize.joint_tsne(v, a, kind="pca")


def test_cli_writes_both_figures_saying_what_it_does(tmp_path, capfd):
  rng = np.random.default_rng(1)
  n = 30
  labels = rng.integers(0, 3, n)
  np.savez(tmp_path / "data.npz", visual_test=rng.normal(size=(n, 64)).astype(np.float32),
           audio_test=rng.normal(size=(n, 16)).astype(np.float32), lab_test=labels)
  retrieval.save_embeddings(tmp_path / "emb.npz", retrieval.Embeddings(
      rng.normal(size=(n, 8)).astype(np.float32), rng.normal(size=(n, 8)).astype(np.float32),
      labels, np.arange(n), protocol="unimodal"))
  assert visualize.main([f"--embeddings={tmp_path / 'emb.npz'}", f"--data={tmp_path / 'data.npz'}",
                         f"--out_dir={tmp_path / 'figs'}", "--perplexity=5"]) == 0
  for name in ("raw_features.png", "embeddings.png"):
    png = (tmp_path / "figs" / name).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  err = capfd.readouterr().err  # progress while it works (it took 50 s in silence)
  for said in ("30 items' embeddings ready in", "t-SNE of 30 raw feature "
               "pairs", "t-SNE of 30 embedding pairs", "embeddings' t-SNE in"):
    assert said in err, err
