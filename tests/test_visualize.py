"""Tests of the t-SNE figure CLI (dsf3n_jax.visualize)."""

import numpy as np
import pytest

from dsf3n_jax import retrieval, retrieve, visualize


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


def test_embeddings_alone_draw_one_figure_that_names_no_split(tmp_path, monkeypatch):
  rng = np.random.default_rng(4)
  n = 30
  labels = rng.integers(0, 3, n)
  retrieval.save_embeddings(tmp_path / "train_emb.npz", retrieval.Embeddings(
      rng.normal(size=(n, 8)).astype(np.float32), rng.normal(size=(n, 8)).astype(np.float32),
      labels, np.arange(n), protocol="unimodal"))
  titles = []
  plot = visualize.plot_plane
  monkeypatch.setattr(visualize, "plot_plane",
                      lambda *a, **k: titles.append(k["title"]) or plot(*a, **k))
  assert visualize.main([f"--embeddings={tmp_path / 'train_emb.npz'}",
                         f"--out_dir={tmp_path / 'figs'}", "--perplexity=5"]) == 0
  assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["embeddings.png"]
  assert titles == ["learned embeddings (train_emb.npz)"]  # not the default split's "(test)"


def test_bad_input_is_named_and_classes_keep_distinct_colours(tmp_path):
  rng = np.random.default_rng(2)
  n = 30
  labels = rng.integers(0, 3, n)
  np.savez(tmp_path / "data.npz", visual_test=rng.normal(size=(n, 64)).astype(np.float32),
           audio_test=rng.normal(size=(n, 16)).astype(np.float32), lab_test=labels,
           visual_train=rng.normal(size=(n, 64)).astype(np.float32),
           audio_train=rng.normal(size=(n, 16)).astype(np.float32),
           lab_train=(labels + 1) % 3)
  emb = retrieval.Embeddings(rng.normal(size=(n, 8)).astype(np.float32),
                             rng.normal(size=(n, 8)).astype(np.float32), labels, np.arange(n),
                             protocol="unimodal")
  retrieval.save_embeddings(tmp_path / "emb.npz", emb)
  common = [f"--embeddings={tmp_path / 'emb.npz'}", f"--data={tmp_path / 'data.npz'}",
            f"--out_dir={tmp_path / 'figs'}", "--perplexity=5"]
  # The embeddings of the test split drawn over the train split's features.
  with pytest.raises(ValueError, match=r"--split=train: 30 of 30 rows have other labels"):
    visualize.main([*common, "--split=train"])
  retrieval.save_embeddings(tmp_path / "neg.npz", retrieval.Embeddings(
      emb.emb_visual, emb.emb_audio, labels, np.arange(n) - 1, protocol="unimodal"))
  with pytest.raises(ValueError, match=r"indices run from -1 to 28"):
    visualize.main([f"--embeddings={tmp_path / 'neg.npz'}", *common[1:]])
  with pytest.raises(ValueError, match="--max_points=0: expected at least 1"):
    visualize.main([*common, "--max_points=0"])
  with pytest.raises(ValueError, match=r"--batch_size=8: not read with --embeddings \(they are "
                     "embedded already"):  # it would do nothing
    visualize.main([*common, "--batch_size=8"])
  assert not list(tmp_path.glob("figs/*.png"))  # no figure from a refused run
  # retrieve ranks embeddings as they are: a --data beside them is refused, not ignored.
  with pytest.raises(ValueError, match="--data: not read with --embeddings"):
    retrieve.main([f"--embeddings={tmp_path / 'emb.npz'}", f"--data={tmp_path / 'data.npz'}"])
  with pytest.raises(ValueError, match="--split=train: not read with --embeddings"):
    retrieve.main([f"--embeddings={tmp_path / 'emb.npz'}", "--split=train"])
  for count in (3, 20, 25):
    assert len(set(visualize.class_colors(count))) == count


def test_usage_errors_are_found_before_anything_is_embedded_and_exit_2(tmp_path, capsys,
                                                                       monkeypatch):
  """--out_dir that is a file (or under one), bad values, a split --data lacks: one line, exit
  status 2, before the (long) embedding of the split."""
  from dsf3n_jax import cli
  rng = np.random.default_rng(3)
  np.savez(tmp_path / "data.npz", visual_test=rng.normal(size=(4, 8)).astype(np.float32),
           audio_test=rng.normal(size=(4, 8)).astype(np.float32), lab_test=[0, 1, 0, 1])
  (tmp_path / "file").write_text("not a folder")
  monkeypatch.setattr(retrieval, "embeddings_from_flags",
                      lambda *a, **k: pytest.fail("embedded before the flags were checked"))
  given, figs = [f"--workdir={tmp_path / 'run'}"], f"--out_dir={tmp_path / 'figs'}"
  for argv, line in (
      ([f"--out_dir={tmp_path / 'file'}"],
       f"--out_dir={tmp_path / 'file'}: expected a folder (new or existing) to write in; found "
       "a file"),
      ([f"--out_dir={tmp_path / 'file' / 'figs'}"],
       f"--out_dir={tmp_path / 'file' / 'figs'}: expected a folder (new or existing) to write "
       f"in; found a file ({tmp_path / 'file'})"),
      ([figs, "--max_points=0"], "--max_points=0: expected at least 1"),
      ([figs, "--batch_size=0"], "--batch_size=0: expected an int >= 1"),
      ([figs, "--perplexity=-1"], "--perplexity=-1.0: expected a number > 0"),
      # --split beside --embeddings alone would only relabel the figure: refused.
      ([f"--embeddings={tmp_path / 'emb.npz'}", "--split=train", figs],
       "--split=train: not read with --embeddings alone (the embeddings are of the split they "
       "were made of); with --data=FILE it names the split of the raw features"),
      ([f"--embeddings={tmp_path / 'emb.npz'}", f"--data={tmp_path / 'data.npz'}",
        "--split=train", figs],
       f"--split=train: --data={tmp_path / 'data.npz'} has no such split (no visual_train, "
       "audio_train or lab_train); expected one of its splits: test")):
    capsys.readouterr()
    assert cli.run(visualize.main, [*([] if "--embeddings" in argv[0] else given), *argv]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {line}"], argv
  assert not (tmp_path / "figs").exists()
