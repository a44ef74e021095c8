"""Search a library: the exact kernel, building an index (and resuming it), searching it."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.spatial.distance

from dsf3n_jax import cli, knn, metrics, retrieval, retrieve, train
from dsf3n_jax import index as index_lib
from dsf3n_jax import search as search_lib
from dsf3n_jax.datasets.synthetic import generate_synthetic
from tests.test_distributed import env, free_port
from tests.test_train import REPO, mesh_of, tiny_config


def brute_force(queries, items, k, distance="cosine"):
  """The float32 distances of the metric (all of them), nearest first, ties by the lower row."""
  dist = np.asarray(metrics.pairwise_distances(queries, items, distance=distance))
  order = np.argsort(dist, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(dist, order, axis=1)


def numpy_brute_force(queries, items, k):
  """numpy, float32: cosine distances of every pair, a stable sort (ties: the lower row)."""
  dots = queries @ items.T
  dist = 1 - dots / np.linalg.norm(queries, axis=1)[:, None] / np.linalg.norm(items, axis=1)
  order = np.argsort(dist, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(dist, order, axis=1)


@pytest.mark.parametrize("devices", [1, 8])
def test_the_kernel_gives_a_float32_brute_force_ties_included(devices):
  rng = np.random.default_rng(0)
  # Entries +-1 in 16 dimensions: every dot product is an exact integer and every norm 4, so
  # each distance is exact whatever the summation order, and 17 values for 1,003 items: ties
  # everywhere.
  items = rng.choice([-1.0, 1.0], size=(1003, 16)).astype(np.float32)
  queries = rng.choice([-1.0, 1.0], size=(37, 16)).astype(np.float32)
  ref_rows, ref_scores = numpy_brute_force(queries, items, 10)
  assert (np.diff(ref_scores, axis=1) == 0).any()  # ties among the ten nearest
  np.testing.assert_array_equal((ref_rows, ref_scores), brute_force(queries, items, 10))
  for block in (7, 64, 4096):  # many merges, some, one block per device
    library = knn.Library.put(items, mesh=mesh_of(devices), block=block)
    for approximate in (False, True):  # approx_max_k is exact on CPU
      rows, scores = library.search(queries, 10, query_block=16, approximate=approximate)
      np.testing.assert_array_equal(rows, ref_rows)
      np.testing.assert_array_equal(scores, ref_scores)
  # A query alone (padded to a block of 8) ranks as in a batch, near-ties included; so does
  # --approximate on CPU, ties by the lower row.
  small = rng.integers(-2, 3, size=(38, 3)).astype(np.float32)
  q = rng.integers(-2, 3, size=(34, 3)).astype(np.float32)
  library = knn.Library.put(small, mesh=mesh_of(devices))
  batch, _ = library.search(q, 10)
  for i in range(len(q)):
    np.testing.assert_array_equal(library.search(q[i:i + 1], 10)[0][0], batch[i], err_msg=i)
  np.testing.assert_array_equal(library.search(q, 10, approximate=True)[0], batch)
  tied = knn.Library.put(np.array([[1], [2], [-1], [1], [2], [0], [1]], np.float32),
                         mesh=mesh_of(devices), block=7)
  assert tied.search(np.ones((1, 1), np.float32), 1, approximate=True)[0].tolist() == [[0]]
  gaussian = rng.normal(size=(500, 24)).astype(np.float32)
  q = rng.normal(size=(9, 24)).astype(np.float32)
  ref_rows, ref = brute_force(q, gaussian, 5, "euclidean")
  rows, dist = knn.Library.put(gaussian, distance="euclidean", mesh=mesh_of(devices),
                               block=32).search(q, 5)
  np.testing.assert_array_equal(rows, ref_rows)
  np.testing.assert_allclose(dist, ref, rtol=1e-5)


@pytest.mark.parametrize("devices", [1, 8])
def test_the_approximate_path_finds_the_exact_neighbours_where_its_top_k_is_exact(
    devices, monkeypatch):
  """The accelerators' path (``approx_max_k`` per block), taken on CPU, where XLA computes it
  exactly: without ties, every block's candidates, their ids and the merges are the exact
  search's."""
  rng = np.random.default_rng(2)
  items = rng.normal(size=(700, 24)).astype(np.float32)
  queries = rng.normal(size=(21, 24)).astype(np.float32)
  want = {}
  for distance in ("cosine", "euclidean"):
    library = knn.Library.put(items, distance=distance, mesh=mesh_of(devices), block=32)
    want[distance] = library.search(queries, 12)
  taken = []

  def approximates(mesh):
    taken.append(mesh)
    return True

  monkeypatch.setattr(knn, "_approximates", approximates)
  knn._search_fn.cache_clear()  # programs built under the CPU rule
  try:
    for distance, (rows, dist) in want.items():
      library = knn.Library.put(items, distance=distance, mesh=mesh_of(devices), block=32)
      got_rows, got_dist = library.search(queries, 12, approximate=True, query_block=8)
      np.testing.assert_array_equal(got_rows, rows, err_msg=distance)
      np.testing.assert_allclose(got_dist, dist, rtol=1e-6, atol=1e-6, err_msg=distance)
  finally:
    knn._search_fn.cache_clear()
  assert len(taken) == 2


def test_euclidean_search_keeps_its_precision_far_from_the_origin():
  """Norms ~ 240, distances ~ 0.2 (the metric's test): uncentred, the expanded square keeps a
  few bits and most neighbours come out in the wrong order. Integer data far from the origin
  keeps its exact ties, ranked by the lower row, as the metric ranks them."""
  rng = np.random.default_rng(0)
  centre = rng.normal(size=64) * 30
  items, queries = ((centre + rng.normal(size=(n, 64)) * 0.02).astype(np.float32)
                    for n in (300, 20))
  want = scipy.spatial.distance.cdist(queries.astype(np.float64), items.astype(np.float64))
  rows, dist = knn.Library.put(items, distance="euclidean", block=64).search(queries, 10)
  np.testing.assert_array_equal(rows, np.argsort(want, axis=1, kind="stable")[:, :10])
  np.testing.assert_allclose(dist, np.take_along_axis(want, rows, axis=1), rtol=1e-5)
  ints = (1000 + rng.integers(-2, 3, size=(200, 5))).astype(np.float32)
  q = (1000 + rng.integers(-2, 3, size=(15, 5))).astype(np.float32)
  ref_rows, ref = brute_force(q, ints, 20, "euclidean")
  assert (np.diff(ref, axis=1) == 0).any()  # ties among the twenty nearest
  for devices in (1, 8):  # one array, or row blocks (an index's shards) that no device's rows
    # line up with: the same results
    for items in (ints, [ints[:37], ints[37:37], ints[37:150], ints[150:]], ints.tolist(),
                  jax.numpy.asarray(ints)):  # rows as a list, or a jax.Array: one array
      library = knn.Library.put(items, distance="euclidean", block=16, mesh=mesh_of(devices))
      rows, dist = library.search(q, 20)
      np.testing.assert_array_equal(rows, ref_rows)
      np.testing.assert_array_equal(dist, ref)


# The tests that take ``run`` run on one xdist worker (``--dist loadgroup``, pyproject.toml):
# spread over two, each worker would build it.
SHARES_RUN = pytest.mark.xdist_group("search_run")


@pytest.mark.parametrize("devices", [1, 8])
def test_on_float_data_the_kernel_ranks_as_the_metric_within_an_ulp(devices):
  """Gaussian rows: each (query block x library block) product may round apart from the
  metric's one product by an ulp, so near-ties may swap; the distances, the order and the mAP
  agree within that."""
  rng = np.random.default_rng(1)
  items = rng.normal(size=(1000, 16)).astype(np.float32)
  queries = rng.normal(size=(50, 16)).astype(np.float32)
  item_labels, query_labels = rng.integers(0, 10, 1000), rng.integers(0, 10, 50)
  library = knn.Library.put(items, mesh=mesh_of(devices), block=96)
  # Each device computed its own rows' norms: the library was never whole on one device.
  for array in (library.items, library.norms):
    assert tuple(array.sharding.spec) == ("data",)
    assert len(array.sharding.device_set) == devices
  rows, dist = library.search(queries, 1000)  # every item ranked
  assert (np.sort(rows, axis=1) == np.arange(1000)).all()
  ref = np.asarray(metrics.pairwise_distances(queries, items))
  along = np.take_along_axis(ref, rows, axis=1)
  np.testing.assert_allclose(dist, along, rtol=0, atol=1e-6)
  assert (np.diff(along, axis=1) >= -1e-6).all()  # in the metric's order, up to an ulp
  relevant = item_labels[rows] == query_labels[:, None]
  hits = np.cumsum(relevant, axis=1)
  ap = (hits / np.arange(1, 1001) * relevant).sum(1) / np.maximum(relevant.sum(1), 1)
  assert ap.mean() == pytest.approx(metrics.mean_average_precision(
      queries, items, query_labels, item_labels), abs=1e-6)


def test_the_kernel_names_bad_rows_and_k():
  library = knn.Library.put(np.eye(5, 3, dtype=np.float32))
  ids, dist = library.search(np.zeros((0, 3), np.float32), 2)  # no queries: nothing found
  assert ids.shape == dist.shape == (0, 2)
  cases = {"queries: row 1 is not finite (NaN or Inf; 1 such rows)": (
               [[1, 0, 0], [np.nan, 0, 0]], 2),
           "queries: row 0 is too large": ([[1e20, 0, 0]], 2),
           "queries: expected 3-d rows (the library's), found 2-d": ([[1, 0]], 2),
           "k=8: expected an int from 1 to the 5 items searched": ([[1, 0, 0]], 8),
           "k=0: expected": ([[1, 0, 0]], 0)}
  for message, (queries, k) in cases.items():
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
      library.search(np.asarray(queries, np.float32), k)
  with pytest.raises(ValueError, match="library: expected at least one item, found 0"):
    knn.Library.put(np.zeros((0, 3), np.float32))
  with pytest.raises(ValueError, match="library: row 2 is not finite"):
    knn.Library.put(np.array([[1, 0], [0, 1], [np.inf, 0]], np.float32))
  with pytest.raises(ValueError, match="library: row 4 is not finite"):  # numbered across blocks
    knn.Library.put([np.eye(3, 2, dtype=np.float32), np.array([[1, 1], [np.nan, 0]])])
  with pytest.raises(ValueError, match="library: expected 2-d rows"):
    knn.Library.put([np.eye(3, 2, dtype=np.float32), np.ones((1, 3), np.float32)])
  with pytest.raises(ValueError, match=r"library \(less its first row\): row 1 is too large"):
    knn.Library.put(np.array([[-1.5e19, 0], [1.5e19, 0]], np.float32), distance="euclidean")
  with pytest.raises(ValueError, match="queries: row 0 is not finite"):  # every caller gets it
    retrieval.retrieve([[np.nan, 0, 0]], np.eye(5, 3), [0], np.arange(5), k=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny trained run (1 epoch) that standardises its features, and its test split as the
  run saw it: ``split["visual"]``... standardised, ``split["raw_visual"]``... as stored (what
  a user's new queries and libraries are)."""
  root = tmp_path_factory.mktemp("search")
  workdir = root / "run"
  # Features far from standardised (the synthetic generator's are near it already).
  arrays = generate_synthetic(num_train=96, num_test=40, num_classes=5, seed=0)
  np.savez(root / "pairs.npz", **{k: v * 3 + 5 if k.startswith(("visual_", "audio_")) else v
                                  for k, v in arrays.items()})
  train.train_and_evaluate(tiny_config(num_epochs=1, **{
      "data.name": "paired_features", "data.path": str(root / "pairs.npz"),
      "data.data_dir": str(root / "tfds"), "data.normalize": "standardize"}), str(workdir))
  model, variables, config = train.restore_model(str(workdir))
  split = retrieval.run_split(config, "test")
  raw = retrieval.run_split(config, "test", normalize=False)
  assert not np.allclose(raw["visual"], split["visual"])
  return workdir, model, variables, {**split, "raw_visual": raw["visual"],
                                     "raw_audio": raw["audio"]}


def _index(*argv):
  return index_lib.main([str(a) for a in argv])


@SHARES_RUN
def test_index_and_search_a_run_and_a_features_only_file(run, tmp_path, capsys):
  workdir, model, variables, split = run
  # The run's own test split (labels, row ids) in shards of 16 items.
  assert _index(f"--workdir={workdir}", "--modality=visual", f"--out={tmp_path / 'a'}",
                "--chunk_size=16") == 0
  index = search_lib.Index.load(tmp_path / "a")
  assert (index.count, index.modality, index.manifest["protocol"]) == (40, "visual", "unimodal")
  assert len(index.manifest["shards"]) == 3 and index.labels is not None
  # The library is embedded as evaluation embeds each modality alone.
  alone = retrieval.embed_split(model, variables, split["visual"], split["audio"],
                                protocol="unimodal")
  np.testing.assert_allclose(index.embeddings, alone.emb_visual, rtol=1e-5, atol=1e-6)
  # New audio queries (features as stored), embedded by the same run as it embedded its own:
  # the ids of a brute force over the library.
  np.save(tmp_path / "audio.npy", split["raw_audio"][:5])
  capsys.readouterr()
  assert search_lib.main([f"--index={tmp_path / 'a'}", f"--queries={tmp_path / 'audio.npy'}",
                          f"--workdir={workdir}", "--k=4", "--json"]) == 0
  lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  ref_rows, _ = brute_force(alone.emb_audio[:5], alone.emb_visual, 4)
  assert [x["ids"] for x in lines] == split["index"][ref_rows].tolist()
  fresh = search_lib.Index.load(tmp_path / "a")  # from Python, the 3 shards as they are:
  assert fresh.search(alone.emb_audio[:5], 4).ids.tolist() == split["index"][ref_rows].tolist()
  assert "embeddings" not in vars(fresh)  # never concatenated into a second copy
  assert lines[0]["labels"] == split["label"][ref_rows[0]].tolist()
  assert search_lib.main([f"--index={tmp_path / 'a'}", "--rows=3,4", f"--workdir={workdir}",
                          "--k=4", "--json"]) == 0  # rows of the run's own test split
  assert [json.loads(x)["ids"] for x in capsys.readouterr().out.splitlines()] == split[
      "index"][ref_rows[3:5]].tolist()

  # A features-only file of one modality, no labels; ids given in the file.
  ids = np.arange(100, 140)
  np.savez(tmp_path / "visual.npz", visual_features=split["raw_visual"], ids=ids)
  assert _index(f"--workdir={workdir}", "--modality=visual", f"--out={tmp_path / 'b'}",
                f"--source={tmp_path / 'visual.npz'}") == 0
  other = search_lib.Index.load(tmp_path / "b")
  assert other.labels is None and other.manifest["fingerprint"] == index.manifest["fingerprint"]
  hits = other.search(alone.emb_audio[:5], 4)
  np.testing.assert_array_equal(hits.ids, ids[ref_rows])
  capsys.readouterr()
  assert search_lib.main([f"--index={tmp_path / 'b'}", f"--queries={tmp_path / 'audio.npy'}",
                          f"--workdir={workdir}", "--k=2"]) == 0
  table = capsys.readouterr().out
  assert "query 4:" in table and f"id {ids[ref_rows[0, 0]]}" in table

  # From embeddings computed elsewhere: no model, query embeddings only.
  np.save(tmp_path / "emb.npy", alone.emb_visual)
  assert _index("--modality=visual", f"--out={tmp_path / 'c'}",
                f"--embeddings={tmp_path / 'emb.npy'}") == 0
  given = search_lib.Index.load(tmp_path / "c")
  assert given.manifest["fingerprint"] is None and given.manifest["protocol"] == "given"
  np.testing.assert_array_equal(given.search(alone.emb_audio[:5], 4).rows, ref_rows)

  # retrieve's --workdir with --data: a file's features standardised as the run's own were.
  config = train.restore_model(str(workdir))[2]
  sources = train.load_data(config, normalize=False)
  arrays = {f"{field}_{name}": retrieval.run_split(config, name, normalize=False)[key]
            for name in ("train", "test")
            for field, key in (("visual", "visual"), ("audio", "audio"), ("lab", "label"))}
  assert len(arrays["lab_train"]) == len(sources.train)
  np.savez(tmp_path / "pairs.npz", **arrays)
  from_file = retrieval.embeddings_from_args(workdir=str(workdir), data=tmp_path / "pairs.npz")
  np.testing.assert_allclose(from_file.emb_visual, alone.emb_visual, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(from_file.emb_audio, alone.emb_audio, rtol=1e-5, atol=1e-6)


@SHARES_RUN
def test_a_run_embeds_new_features_without_its_dataset(run, tmp_path, capsys):
  """The run keeps its train statistics (``feature_stats.npz``): a deployed run indexes and
  queries raw features with its dataset gone, as it did with it."""
  workdir, model, variables, split = run
  config = train.restore_model(str(workdir))[2]
  saved = np.load(workdir / "feature_stats.npz")
  for modality, (mean, std) in train.load_data(config).train.stats.items():
    np.testing.assert_array_equal(saved[f"{modality}_mean"], mean)
    np.testing.assert_array_equal(saved[f"{modality}_std"], std)
  np.savez(tmp_path / "visual.npz", visual_features=split["raw_visual"])
  np.save(tmp_path / "audio.npy", split["raw_audio"][:5])
  alone = retrieval.embed_split(model, variables, split["visual"], split["audio"],
                                protocol="unimodal")
  ref_rows, _ = brute_force(alone.emb_audio[:5], alone.emb_visual, 3)
  data = [workdir.parent / "pairs.npz", workdir.parent / "tfds"]
  for path in data:
    path.rename(path.with_name(path.name + ".away"))
  try:
    with pytest.raises(ValueError, match="file not found"):  # the dataset is indeed gone
      train.load_data(config)
    assert _index(f"--workdir={workdir}", "--modality=visual", f"--out={tmp_path / 'i'}",
                  f"--source={tmp_path / 'visual.npz'}") == 0
    np.testing.assert_allclose(search_lib.Index.load(tmp_path / "i").embeddings,
                               alone.emb_visual, rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert search_lib.main([f"--index={tmp_path / 'i'}", f"--queries={tmp_path / 'audio.npy'}",
                            f"--workdir={workdir}", "--k=3", "--json"]) == 0
    assert [json.loads(x)["ids"] for x in capsys.readouterr().out.splitlines()] == (
        ref_rows.tolist())
  finally:
    for path in data:
      path.with_name(path.name + ".away").rename(path)
  # Weights written as a run (a sweep's runs) keep the statistics too.
  from dsf3n_jax.training import restore
  restore.save_variables_as_run(tmp_path / "as_run", variables, config=config)
  again = np.load(tmp_path / "as_run" / "feature_stats.npz")
  for key in saved.files:
    np.testing.assert_array_equal(again[key], saved[key])
  # A damaged statistics file is named, not read as other statistics.
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "feature_stats.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match=r"feature_stats.npz: not the run's feature statistics"):
    train.feature_stats(config, tmp_path / "run")


@SHARES_RUN
def test_a_killed_build_resumes_where_it_stopped(run, tmp_path, monkeypatch, capfd):
  workdir = run[0]
  argv = (f"--workdir={workdir}", "--modality=audio", f"--out={tmp_path / 'i'}",
          "--chunk_size=16")
  real, saved = index_lib._save_npy, []

  def dies_on_the_third_shard(path, array):
    if path.name.startswith("embeddings-00002"):
      raise KeyboardInterrupt  # as a kill would stop it
    saved.append(path.name)
    real(path, array)

  monkeypatch.setattr(index_lib, "_save_npy", dies_on_the_third_shard)
  with pytest.raises(KeyboardInterrupt):
    _index(*argv)
  assert not (tmp_path / "i" / "manifest.json").exists()
  with pytest.raises(search_lib.IndexError_, match="unfinished build: rerun the same"):
    search_lib.Index.load(tmp_path / "i")
  monkeypatch.setattr(index_lib, "_save_npy", real)
  # What a SIGKILL in the middle of a write leaves (paths.atomic_file's temporary file).
  stray = tmp_path / "i" / ".embeddings-00002.npy.tmp123.abcd"
  stray.write_bytes(b"half a shard")
  capfd.readouterr()
  assert _index(*argv) == 0
  assert not stray.exists()
  err = capfd.readouterr().err
  assert "resuming the build" in err and "2 of 3 shards done" in err, err
  assert _index(f"--workdir={workdir}", "--modality=audio", f"--out={tmp_path / 'fresh'}",
                "--chunk_size=16") == 0
  a, b = search_lib.Index.load(tmp_path / "i"), search_lib.Index.load(tmp_path / "fresh")
  np.testing.assert_array_equal(a.embeddings, b.embeddings)
  np.testing.assert_array_equal(a.ids, b.ids)
  assert not list((tmp_path / "i").glob("progress-*.json"))


def _error(main, argv, capsys) -> str:
  """The one ``error:`` line a command line prints for ``argv`` (exit status not 0)."""
  capsys.readouterr()
  status = cli.run(main, [str(a) for a in argv])
  err = capsys.readouterr().err
  lines = [x for x in err.splitlines() if x.startswith("error:")]
  assert status != 0 and len(lines) == 1, err
  return lines[0]


@SHARES_RUN
def test_bad_input_is_one_line_naming_file_flag_expected_and_found(run, tmp_path, capsys):
  workdir, _, _, split = run
  out = tmp_path / "idx"
  assert _index(f"--workdir={workdir}", "--modality=visual", f"--out={out}") == 0
  index = search_lib.Index.load(out)
  emb = tmp_path / "q.npy"

  np.save(emb, np.ones((2, 7), np.float32))  # a dimension mismatch
  line = _error(search_lib.main, [f"--index={out}", f"--query_embeddings={emb}"], capsys)
  assert f"--query_embeddings={emb}" in line and "expected 16-d rows" in line
  assert "found 7-d" in line
  np.save(emb, np.array([[0.0] * 16, [np.nan] * 16], np.float32))  # NaN in the queries
  line = _error(search_lib.main, [f"--index={out}", f"--query_embeddings={emb}"], capsys)
  assert "row 1 is not finite" in line
  np.save(emb, np.full((2, 16), 1e20, np.float32))  # finite, but |x|^2 overflows float32
  line = _error(search_lib.main, [f"--index={out}", f"--query_embeddings={emb}"], capsys)
  assert "row 0 is too large (its squared norm overflows float32; 2 such rows)" in line
  np.save(emb, np.zeros((0, 16), np.float32))  # no queries
  line = _error(search_lib.main, [f"--index={out}", f"--query_embeddings={emb}"], capsys)
  assert f"--query_embeddings={emb}: no queries (0 rows)" in line
  np.save(emb, np.ones((1, 16), np.float32))
  for k in (0, 41):  # k < 1, k > items
    line = _error(search_lib.main, [f"--index={out}", f"--query_embeddings={emb}", f"--k={k}"],
                  capsys)
    assert f"--k={k}: expected an int from 1 to the 40 items searched" in line
  # Flags that would be ignored are refused: a run beside given embeddings, a split without
  # rows of it.
  line = _error(search_lib.main, [f"--index={out}", f"--query_embeddings={emb}",
                                  f"--workdir={workdir}"], capsys)
  assert "--workdir: not used with --query_embeddings" in line
  line = _error(search_lib.main, [f"--index={out}", f"--query_embeddings={emb}",
                                  "--split=train"], capsys)
  assert "--split=train: only with --rows" in line
  for flag in ("--k=0", "--batch_size=0"):
    line = _error(retrieve.main, [f"--workdir={workdir}", "--queries=0", flag], capsys)
    assert f"{flag}: expected an int >= 1" in line
  audio = tmp_path / "audio.npy"
  np.save(audio, split["audio"][:2])
  manifest = json.loads((out / "manifest.json").read_text())  # made by another model
  (out / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 64}))
  line = _error(search_lib.main, [f"--index={out}", f"--queries={audio}",
                                  f"--workdir={workdir}"], capsys)
  assert f"--workdir={workdir}: its model" in line and "is not the one that built" in line
  (out / "manifest.json").write_text(json.dumps(manifest))
  shard = out / manifest["shards"][0]["embeddings"]  # a truncated shard
  shard.write_bytes(shard.read_bytes()[:-100])
  line = _error(search_lib.main, [f"--index={out}", f"--query_embeddings={emb}"], capsys)
  assert str(shard) in line and "truncated" in line and "expected 40 rows" in line

  bad = tmp_path / "bad.npy"  # NaN in the library
  rows = split["visual"].copy()
  rows[7, 3] = np.inf
  np.save(bad, rows)
  line = _error(index_lib.main, [f"--workdir={workdir}", "--modality=visual",
                                 f"--out={tmp_path / 'x'}", f"--source={bad}"], capsys)
  assert f"--source={bad}" not in line and str(bad) in line and "row 7 is not finite" in line
  width = split["visual"].shape[1]
  np.save(bad, np.zeros((0, width), np.float32))  # an empty library
  line = _error(index_lib.main, [f"--workdir={workdir}", "--modality=visual",
                                 f"--out={tmp_path / 'y'}", f"--source={bad}"], capsys)
  assert str(bad) in line and "the library is empty" in line
  np.save(bad, np.zeros((3, 5), np.float32))  # features of another size than the model's
  line = _error(index_lib.main, [f"--workdir={workdir}", "--modality=visual",
                                 f"--out={tmp_path / 'z'}", f"--source={bad}"], capsys)
  assert f"expected {width} features per item (the model's input), found 5" in line
  for size in (0, -4):  # a batch size that would embed nothing
    line = _error(index_lib.main, [f"--workdir={workdir}", "--modality=visual",
                                   f"--out={tmp_path / 'b'}", f"--batch_size={size}"], capsys)
    assert f"--batch_size={size}: expected an int >= 1" in line
  assert not (tmp_path / "b").exists()
  np.save(bad, split["visual"])  # features only: no split to choose
  line = _error(index_lib.main, [f"--workdir={workdir}", "--modality=visual",
                                 f"--out={tmp_path / 'c'}", f"--source={bad}", "--split=train"],
                capsys)
  assert f"--split=train: --source={bad} holds features only" in line
  line = _error(index_lib.main, ["--modality=visual", f"--out={tmp_path / 'c'}",
                                 f"--embeddings={emb}", "--split=train"], capsys)
  assert "--embeddings: give it alone" in line and "--split" in line
  for flag in ("--checkpoint=latest", "--batch_size=8"):  # flags it would not read
    line = _error(index_lib.main, ["--modality=visual", f"--out={tmp_path / 'c'}",
                                   f"--embeddings={emb}", flag], capsys)
    assert f"--embeddings: give it alone, without {flag.split('=')[0]} (" in line
  np.save(bad, np.full((3, 16), 1e20, np.float32))  # rows every search would refuse
  line = _error(index_lib.main, ["--modality=visual", f"--out={tmp_path / 'd'}",
                                 f"--embeddings={bad}"], capsys)
  assert f"shard 0 of {bad} (rows 0..2): row 0 is too large" in line
  given = np.ones((10, 16), np.float32)
  given[7, 3] = np.nan  # in the second shard of four rows: numbered in the whole library
  np.save(bad, given)
  line = _error(index_lib.main, ["--modality=visual", f"--out={tmp_path / 'e'}",
                                 f"--embeddings={bad}", "--chunk_size=4"], capsys)
  assert f"shard 1 of {bad} (rows 4..7): row 7 is not finite (NaN or Inf; 1 such rows)" in line
  assert index.count == 40 and pathlib.Path(out).is_dir()


@SHARES_RUN
def test_usage_errors_name_the_flag_given_and_exit_2(run, tmp_path, capsys):
  """A bad flag value (a dataset name, a split the source lacks, k, a folder that holds no
  index) is named by the flag the user gave, with what exists, in one line; exit status 2."""
  workdir = run[0]
  pairs = workdir.parent / "pairs.npz"  # the run's paired-feature file: train and test

  def usage(main, argv) -> str:
    capsys.readouterr()
    status = cli.run(main, [str(a) for a in argv])
    lines = capsys.readouterr().err.splitlines()
    errors = [x for x in lines if x.startswith("error:")]
    assert status == 2 and len(errors) == 1, lines
    return errors[0]

  line = usage(index_lib.main, [f"--workdir={workdir}", "--modality=visual",
                                f"--out={tmp_path / 'a'}", "--tfds=bad_name"])
  assert line.startswith("error: --tfds=bad_name: not 'synthetic' and not a TFDS dataset this "
                         "process can build (DatasetNotFoundError"), line
  assert "config.data.name" not in line and "(name it --tfds=module:name)" in line, line
  line = usage(index_lib.main, [f"--workdir={workdir}", "--modality=visual",
                                f"--out={tmp_path / 'a'}", f"--source={pairs}",
                                "--split=validation"])
  assert line == (f"error: --split=validation: --source={pairs} has no such split (no "
                  "visual_validation, audio_validation or lab_validation); expected one of its "
                  "splits: test, train")
  (tmp_path / "file").write_text("x")
  line = usage(index_lib.main, ["--modality=visual", f"--out={tmp_path / 'file'}",
                                f"--embeddings={tmp_path / 'emb.npy'}"])
  assert line == (f"error: --out={tmp_path / 'file'}: expected a folder (new or existing) to "
                  "write in; found a file")
  assert not (tmp_path / "a").exists()
  np.save(tmp_path / "emb.npy", np.eye(5, 4, dtype=np.float32))
  assert _index("--modality=visual", f"--out={tmp_path / 'i'}",
                f"--embeddings={tmp_path / 'emb.npy'}") == 0
  query = [f"--index={tmp_path / 'i'}", f"--query_embeddings={tmp_path / 'emb.npy'}"]
  for k in (0, 6):  # checked before any query is read
    assert usage(search_lib.main, [*query, f"--k={k}"]) == (
        f"error: --k={k}: expected an int from 1 to the 5 items searched")
  for where, found in ((tmp_path / "absent", "no such folder"), (tmp_path / "file", "a file"),
                       (tmp_path, "not an index folder")):
    assert usage(search_lib.main, [f"--index={where}", *query[1:]]) == (
        f"error: --index={where}: manifest.json not found ({found}); expected a folder that "
        "python -m dsf3n_jax.index wrote")
  line = usage(search_lib.main, [query[0], f"--queries={tmp_path / 'emb.npy'}",
                                 f"--workdir={workdir}", "--k=2"])
  assert "built from given embeddings (no model): pass query embeddings" in line


@SHARES_RUN
def test_index_refuses_bad_source_flags_before_it_restores_the_run(run, tmp_path, capsys,
                                                                   monkeypatch):
  """A dataset name, a split the source lacks, flags that do not go together: refused before
  the run's checkpoint is read (restoring a large model takes long); good flags still build."""
  workdir = run[0]
  pairs = workdir.parent / "pairs.npz"
  restored = []

  def restore_model(*args, **kwargs):
    restored.append(args)
    raise AssertionError("the run was restored before the flags were checked")

  real = train.restore_model
  monkeypatch.setattr(train, "restore_model", restore_model)
  flags = [f"--workdir={workdir}", "--modality=visual", f"--out={tmp_path / 'a'}"]
  for argv, start in (
      (["--tfds=bad_name"], "--tfds=bad_name: not 'synthetic' and not a TFDS dataset"),
      (["--tfds=synthetic", "--split=validation"],
       "--split=validation: --tfds=synthetic has no such split; expected one of its splits: "
       "train, test"),
      (["--split=valid"], "--split=valid: the run's dataset has no such split; expected one of "
       "its splits: train, "),
      ([f"--source={pairs}", "--split=validation"],
       f"--split=validation: --source={pairs} has no such split"),
      ([f"--source={pairs}", "--tfds=synthetic"], "--source and --tfds: give one of them"),
      ([f"--data_dir={tmp_path}"], f"--data_dir={tmp_path}: read with --tfds only")):
    capsys.readouterr()
    assert cli.run(index_lib.main, [*flags, *argv]) == 2, argv
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {start}"), (argv, lines)
  assert not restored and not (tmp_path / "a").exists()
  # Good flags: the library is opened, then the run restored (once) and the index built.
  monkeypatch.setattr(train, "restore_model", lambda *a, **k: restored.append(a) or real(
      *a, **k))
  assert _index(*flags, "--tfds=synthetic", f"--data_dir={tmp_path / 'tfds'}",
                "--split=test") == 0
  assert len(restored) == 1
  built = search_lib.Index.load(tmp_path / "a")
  assert built.manifest["source"]["split"] == "test" and built.count == 600


@pytest.mark.slow
@SHARES_RUN
def test_two_processes_build_the_index_one_process_builds(run, tmp_path):
  """Each process embeds every other shard on its own devices; process 0 writes the manifest.
  The same items, ids and embeddings as one process, and a dataset by name (--tfds)."""
  workdir = run[0]
  flags = [f"--workdir={workdir}", "--modality=visual", "--tfds=synthetic", "--chunk_size=16"]
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "dsf3n_jax.index", *flags, f"--out={tmp_path / 'two'}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  assert _index(*flags, f"--out={tmp_path / 'one'}") == 0
  two, one = search_lib.Index.load(tmp_path / "two"), search_lib.Index.load(tmp_path / "one")
  assert two.manifest["source"]["tfds"] == "synthetic" and two.count == one.count
  assert len(two.manifest["shards"]) == -(-one.count // 16)
  np.testing.assert_array_equal(two.ids, one.ids)
  np.testing.assert_allclose(two.embeddings, one.embeddings, rtol=1e-5, atol=1e-6)
