"""Tests of the input pipeline: orders, host shards, resumption, eval padding, device mode."""

import json
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsf3n_jax import input_pipeline as ip


def _source(n=53, dv=6, da=4, c=5):
  rng = np.random.default_rng(0)
  return ip.ArraySource(rng.standard_normal((n, dv)), rng.standard_normal((n, da)),
                        np.arange(n) % c)


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((8,), ("data",))


def _take(loader, k):
  return [{kk: np.asarray(v) for kk, v in next(loader).items()} for _ in range(k)]


def test_epoch_permutation_definition_and_jit():
  p = ip.epoch_permutation(3, 2, 50)
  want = jax.random.permutation(jax.random.fold_in(jax.random.key(3), 2), 50)
  np.testing.assert_array_equal(p, want)
  jitted = jax.jit(ip.epoch_permutation, static_argnums=2)(3, 2, 50)
  np.testing.assert_array_equal(p, jitted)
  assert sorted(np.asarray(p).tolist()) == list(range(50))


def test_train_batches_sharded_and_shuffled(mesh):
  src = _source()
  loader = ip.TrainLoader(src, global_batch_size=16, mesh=mesh, seed=1)
  assert loader.steps_per_epoch == 3
  batches = _take(loader, 6)
  b = next(ip.TrainLoader(src, global_batch_size=16, mesh=mesh, seed=1))
  assert b["visual"].sharding == NamedSharding(mesh, P("data"))
  assert b["visual"].shape == (16, 6) and b["label"].dtype == np.int32
  perm0 = np.asarray(ip.epoch_permutation(1, 0, 53))
  perm1 = np.asarray(ip.epoch_permutation(1, 1, 53))
  for s in range(3):
    np.testing.assert_array_equal(batches[s]["index"], perm0[s * 16:(s + 1) * 16])
    np.testing.assert_array_equal(batches[3 + s]["index"], perm1[s * 16:(s + 1) * 16])
    np.testing.assert_array_equal(batches[s]["visual"], src.visual[perm0[s * 16:(s + 1) * 16]])
  # Epochs differ, an epoch has no repeats, and the same seed repeats them.
  e0 = np.concatenate([x["index"] for x in batches[:3]])
  e1 = np.concatenate([x["index"] for x in batches[3:]])
  assert len(set(e0.tolist())) == 48 and not np.array_equal(e0, e1)
  other = _take(ip.TrainLoader(src, global_batch_size=16, mesh=mesh, seed=2), 1)
  assert not np.array_equal(other[0]["index"], batches[0]["index"])
  assert loader.epoch == 2 and loader.step == 0
  loader.close()


def test_file_order_matches_original(mesh):
  src = _source()
  loader = ip.TrainLoader(src, global_batch_size=16, mesh=mesh, shuffle=False)
  got = _take(loader, 4)
  # The original: for i in range(n // B): x[i*B:(i+1)*B], every epoch the same.
  for i, b in enumerate(got):
    s = (i % 3) * 16
    np.testing.assert_array_equal(b["visual"], src.visual[s:s + 16])
    np.testing.assert_array_equal(b["label"], src.label[s:s + 16])


@pytest.mark.parametrize("prefetch", [True, False])
def test_save_restore_continues_identically(mesh, prefetch):
  src = _source()
  ref = ip.TrainLoader(src, global_batch_size=8, mesh=mesh, seed=7, prefetch=prefetch)
  want = _take(ref, 12)
  a = ip.TrainLoader(src, global_batch_size=8, mesh=mesh, seed=7, prefetch=prefetch)
  _take(a, 5)
  state = json.loads(json.dumps(a.get_state()))
  assert state == dict(epoch=0, step=5, seed=7, shuffle=True)
  b = ip.TrainLoader(src, global_batch_size=8, mesh=mesh, seed=0, prefetch=prefetch)
  b.set_state(state)
  for w, g in zip(want[5:], _take(b, 7), strict=True):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])
  for loader in (ref, a, b):
    loader.close()


def test_two_process_shards_disjoint_and_cover(mesh):
  src = _source(n=64)
  loaders = [ip.TrainLoader(src, global_batch_size=16, mesh=mesh, seed=3, process_index=p,
                            process_count=2, prefetch=False) for p in range(2)]
  assert (loaders[0].lo, loaders[0].hi, loaders[1].lo, loaders[1].hi) == (0, 8, 8, 16)
  seen = []
  for step in range(loaders[0].steps_per_epoch):
    parts = [ld.local_indices(0, step) for ld in loaders]
    assert not set(parts[0]) & set(parts[1])
    np.testing.assert_array_equal(np.concatenate(parts), loaders[0].global_indices(0, step))
    seen.extend(np.concatenate(parts).tolist())
  assert sorted(seen) == list(range(64))
  # Eval: each process's rows, together every item exactly once.
  rows = [list(ip.eval_batch_rows(53, global_batch_size=16, lo=lo, hi=hi))
          for lo, hi in ((0, 8), (8, 16))]
  allrows = [r for proc in rows for rr, m in proc for r in rr[m > 0]]
  assert sorted(allrows) == list(range(53))


def test_eval_covers_every_item_once(mesh):
  src = _source(n=53)
  batches = [{k: np.asarray(v) for k, v in b.items()}
             for b in ip.eval_batches(src, global_batch_size=16, mesh=mesh)]
  assert len(batches) == 4
  mask = np.concatenate([b["mask"] for b in batches])
  idx = np.concatenate([b["index"] for b in batches])
  assert mask.sum() == 53 and mask.dtype == np.float32
  np.testing.assert_array_equal(idx[mask > 0], np.arange(53))
  assert (idx[mask == 0] == -1).all()
  vis = np.concatenate([b["visual"] for b in batches])
  np.testing.assert_array_equal(vis[:53], src.visual)


def test_bad_batch_sizes(mesh):
  src = _source()
  with pytest.raises(ValueError, match="multiple of the mesh size 8"):
    ip.TrainLoader(src, global_batch_size=12, mesh=mesh)
  with pytest.raises(ValueError, match="exceeds the split size 53"):
    ip.TrainLoader(src, global_batch_size=64, mesh=mesh)


def test_on_device_split_replicated(mesh):
  src = _source()
  arrays = ip.load_split_arrays(src)
  dev = ip.to_device(arrays, mesh)
  assert dev["visual"].sharding == NamedSharding(mesh, P())
  np.testing.assert_array_equal(dev["visual"], src.visual)
  # The on-device epoch sees the streaming loader's batches.
  perm = ip.epoch_permutation(0, 0, len(src))
  on_dev = np.asarray(dev["index"][perm[:16]])
  first = next(ip.TrainLoader(src, global_batch_size=16, mesh=mesh, prefetch=False))
  np.testing.assert_array_equal(on_dev, first["index"])


def test_a_carve_of_items_paired_more_than_once_keeps_them_on_one_side():
  """Each image in two pairs (rows 2i, 2i+1), and one clip in three: drawn row by row,
  validation shares inputs with train (a warning says so); drawn by groups, it shares none."""
  rng = np.random.default_rng(0)
  n = 120
  label = np.repeat(np.arange(3), n // 3)
  visual = np.repeat(rng.normal(size=(n // 2, 6)), 2, axis=0).astype(np.float32)
  audio = rng.normal(size=(n, 4)).astype(np.float32)
  audio[[5, 9, 44]] = audio[5]  # rows 4-5, 8-9 and 44-45 become one group of six
  src = ip.ArraySource(visual, audio, label)
  with pytest.warns(ip.SharedItemsWarning, match=r"train: \d+ of the 24 validation rows .* "
                    r"share a visual or audio feature vector with a train row"):
    ip.carve_validation(src, label, fraction=0.2, seed=0)
  groups = ip.duplicate_groups(visual, audio)
  assert len(np.unique(groups)) == n // 2 - 2
  assert len({int(groups[i]) for i in (4, 5, 8, 9, 44, 45)}) == 1
  with warnings.catch_warnings():
    warnings.simplefilter("error", ip.SharedItemsWarning)
    train, val = ip.carve_validation(src, label, fraction=0.2, seed=0, groups="duplicates")
  train_rows, val_rows = train.rows, val.rows
  assert not set(groups[train_rows]) & set(groups[val_rows])
  assert sorted([*train_rows, *val_rows]) == list(range(n))
  # 0.2 of 40 rows a class, a group counted in its first row's class (the group of six spans
  # classes 0 and 1): near-stratified.
  assert len(val_rows) == 24 and np.abs(np.bincount(label[val_rows]) - 8).max() <= 2
  again = ip.carve_validation(src, label, fraction=0.2, seed=0, groups="duplicates")[1]
  np.testing.assert_array_equal(again.rows, val_rows)
  # Groups spanning classes: class 0's two rows share their images with class 1's rows (the
  # groups count in class 1); whatever the draw, each class keeps a train row.
  lab = np.array([1, 0, 1, 0, 1, 1, 1, 1])
  vis = np.arange(16, dtype=np.float32).reshape(8, 2)
  vis[1], vis[3] = vis[0], vis[2]
  vis[5] = -0.0  # equal to row 4's +0.0 once 4 is zeros too: one group
  vis[4] = 0.0
  spanning = ip.duplicate_groups(vis, np.arange(8, dtype=np.float32)[:, None])
  assert spanning[4] == spanning[5] and spanning[0] == spanning[1] != spanning[2]
  for seed in range(20):
    tr, _ = ip.stratified_split(lab, fraction=0.7, seed=seed, groups=spanning)
    assert set(lab[tr]) == {0, 1}, seed
  with pytest.raises(ValueError, match="validation_groups='pairs': expected one of none, "):
    ip.carve_validation(src, label, fraction=0.2, seed=0, groups="pairs")


def test_synthetic_sources_and_validation_split():
  s = ip.load_sources("synthetic", synthetic=dict(num_train=200, num_test=50, seed=1),
                      validation_fraction=0.2, validation_seed=4)
  assert (s.num_classes, s.visual_dim, s.audio_dim) == (10, 1024, 128)
  tr, va = ip.load_split_arrays(s.train), ip.load_split_arrays(s.validation)
  assert len(tr["index"]) + len(va["index"]) == 200
  assert not set(tr["index"].tolist()) & set(va["index"].tolist())
  np.testing.assert_array_equal(np.bincount(va["label"]), np.full(10, 4))
  again = ip.load_sources("synthetic", synthetic=dict(num_train=200, num_test=50, seed=1),
                          validation_fraction=0.2, validation_seed=4)
  np.testing.assert_array_equal(ip.load_split_arrays(again.validation)["index"], va["index"])
  # 20 rows a class: 0.02 of each rounds to none. An empty split is refused, naming the flag.
  with pytest.raises(ip.DataValidationError,
                     match=r"validation_fraction=0\.02 carves no validation row.*above 0\.025"):
    ip.load_sources("synthetic", synthetic=dict(num_train=200, num_test=50, seed=1),
                    validation_fraction=0.02)
  with pytest.raises(ip.DataValidationError, match=r"config.data.num_classes=7, but the "
                     r"synthetic data has config.data.synthetic.num_classes=10 classes"):
    ip.load_sources("synthetic", synthetic=dict(num_train=50, num_test=10, num_classes=10),
                    num_classes=7)
