"""Tests of dsf3n_jax.retrieval and the retrieve CLI with a tiny random-weight model."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsf3n_jax import metrics, retrieval, retrieve
from dsf3n_jax.models import DSF3N

TINY = dict(num_classes=4, encoder_features=64, stem_kernel=8, stem_stride=2, stem_padding=3,
            branch_features=(8, 16, 32), head_kw={"hidden": 32}, embed_dim=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny model, its variables file and a paired-feature file with a 'test' split."""
  tmp = tmp_path_factory.mktemp("tiny")
  rng = np.random.default_rng(0)
  n = 37
  data = {f"{k}_{s}": v for s in ("train", "test") for k, v in (
      ("visual", rng.normal(size=(n, 1024)).astype(np.float32)),
      ("audio", rng.normal(size=(n, 128)).astype(np.float32)),
      ("lab", rng.integers(0, 4, n)))}
  np.savez(tmp / "data.npz", **data)
  model = DSF3N(**TINY)
  variables = model.init(jax.random.key(0), jnp.zeros((2, 1024)), jnp.zeros((2, 128)))
  retrieval.save_variables(tmp / "vars.npz", variables, model_kwargs=TINY)
  return tmp, model, variables, data


def test_variables_round_trip(tiny):
  tmp, _, variables, _ = tiny
  loaded, kwargs = retrieval.load_variables(tmp / "vars.npz")
  assert kwargs["num_classes"] == 4 and tuple(kwargs["branch_features"]) == (8, 16, 32)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded),
               jax.device_get(dict(variables)))


@pytest.mark.parametrize("protocol", ["paired", "unimodal"])
def test_embed_split_pads_and_matches_one_pass(tiny, protocol):
  _, model, variables, data = tiny
  v, a, y = data["visual_test"], data["audio_test"], data["lab_test"]
  emb = retrieval.embed_split(model, variables, v, a, y, batch_size=8, protocol=protocol)
  if protocol == "paired":
    full_v, full_a = model.apply(variables, v, a, train=False)[:2]
  else:
    full_v = model.apply(variables, v, method="embed_visual")
    full_a = model.apply(variables, a, method="embed_audio")
  assert emb.protocol == protocol
  assert emb.emb_visual.shape == (37, 16) and emb.emb_audio.shape == (37, 16)
  np.testing.assert_allclose(emb.emb_visual, full_v, atol=1e-5)
  np.testing.assert_allclose(emb.emb_audio, full_a, atol=1e-5)
  np.testing.assert_array_equal(emb.labels, y)
  np.testing.assert_array_equal(emb.indices, np.arange(37))


def test_unimodal_embeddings_do_not_depend_on_the_other_modality(tiny):
  _, model, variables, data = tiny
  v, a, y = data["visual_test"], data["audio_test"], data["lab_test"]
  emb = retrieval.embed_split(model, variables, v, a, y, batch_size=8)
  other = retrieval.embed_split(model, variables, v, np.zeros_like(a), y, batch_size=8)
  np.testing.assert_array_equal(emb.emb_visual, other.emb_visual)
  paired = retrieval.embed_split(model, variables, v, a, y, batch_size=8, protocol="paired")
  assert np.abs(paired.emb_visual - emb.emb_visual).max() > 1e-4  # the fusion mixes pairs


def test_protocols_are_recorded_and_checked(tiny, tmp_path, capsys):
  tmp, _, _, _ = tiny
  for protocol in ("paired", "unimodal"):
    path = tmp_path / f"{protocol}.npz"
    assert retrieve.main([f"--variables={tmp / 'vars.npz'}", f"--data={tmp / 'data.npz'}",
                          f"--protocol={protocol}", f"--save_embeddings={path}",
                          "--queries=0"]) == 0
    assert retrieval.load_embeddings(path).protocol == protocol
  # An embeddings file made under the other protocol is refused, naming file and flag.
  with pytest.raises(ValueError, match=r"paired\.npz was made under --protocol=paired"):
    retrieve.main([f"--embeddings={tmp_path / 'paired.npz'}", "--protocol=unimodal"])
  with pytest.raises(SystemExit) as e:
    retrieve.main([f"--embeddings={tmp_path / 'paired.npz'}", "--protocol=both"])
  assert e.value.code == 2
  assert "--protocol: invalid choice: 'both' (choose from 'unimodal', 'paired')" in (
      capsys.readouterr().err)
  # Variables without what the chosen stand-in needs: one line naming the file and values.
  with pytest.raises(ValueError, match=r"vars\.npz: missing_partner='learned' needs "
                     r"\['params/placeholder_visual', 'params/placeholder_audio'\]"):
    retrieve.main([f"--variables={tmp / 'vars.npz'}", f"--data={tmp / 'data.npz'}",
                   '--model_kwargs={"missing_partner": "learned"}'])
  # --model_kwargs: JSON, an object, of DSF3N's fields; each named by the flag. Beside
  # --embeddings it is refused as unused, whatever it holds.
  for text, expected in (("{bad", r"--model_kwargs=\{bad: not JSON"),
                         ("[1]", r"expected a JSON object of DSF3N fields, got list"),
                         ('{"bogus": 1}', r"--model_kwargs: unknown DSF3N field\(s\) \['bogus'\]"),
                         ("{bad", r"--model_kwargs: not read with --embeddings")):
    source = (f"--embeddings={tmp_path / 'unimodal.npz'}" if "embeddings" in expected
              else f"--variables={tmp / 'vars.npz'}")
    with pytest.raises(ValueError, match=expected):
      retrieve.main([source, f"--data={tmp / 'data.npz'}" if "--variables" in source
                     else "--queries=0", f"--model_kwargs={text}"])
  with pytest.raises(ValueError, match=r"--checkpoint=latest: read with --workdir only"):
    retrieve.main([f"--embeddings={tmp_path / 'unimodal.npz'}", "--checkpoint=latest"])


def test_usage_errors_exit_2_naming_flag_expected_and_found(tiny, tmp_path, capsys,
                                                             monkeypatch):
  """A bad command line (a flag's value, flags that do not go together, a split the data
  lacks) is one line and exit status 2, as index and search give; found before anything is
  embedded. A file's bad contents stay status 1."""
  from dsf3n_jax import cli
  tmp = tiny[0]
  vars_, data = tmp / "vars.npz", tmp / "data.npz"
  rng = np.random.default_rng(3)
  for protocol in ("unimodal", "paired"):
    retrieval.save_embeddings(tmp_path / f"{protocol}.npz", retrieval.Embeddings(
        rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32),
        np.arange(6) % 2, np.arange(6), protocol=protocol))
  emb = tmp_path / "unimodal.npz"
  retrieval.save_variables(tmp_path / "bare.npz", tiny[2])  # no model arguments stored
  monkeypatch.setattr(retrieval, "embed_split", lambda *a, **k: pytest.fail("embedded"))

  def error(argv) -> tuple[int, list[str]]:
    capsys.readouterr()
    status = cli.run(retrieve.main, [str(a) for a in argv])
    return status, capsys.readouterr().err.splitlines()

  for argv, line in (
      ([f"--embeddings={emb}", "--split=train"],
       "--split=train: not read with --embeddings (its split is the one it was made of)"),
      ([f"--embeddings={emb}", "--queries=a"],
       "--queries: expected comma-separated ints, got 'a'"),
      ([f"--embeddings={emb}", "--queries=99"],
       "--queries: rows [99] out of range [0, 6) of the --split=test"),
      ([f"--embeddings={emb}", f"--variables={vars_}"],
       "expected exactly one of --workdir, --embeddings, --variables; got ['--embeddings', "
       "'--variables']"),
      ([f"--embeddings={emb}", "--checkpoint=latest"],
       "--checkpoint=latest: read with --workdir only (which of the run's checkpoints)"),
      ([f"--embeddings={emb}", "--batch_size=8"],  # embedded already: it would do nothing
       "--batch_size=8: not read with --embeddings (they are embedded already)"),
      ([f"--embeddings={tmp_path / 'paired.npz'}"],
       f"embeddings file {tmp_path / 'paired.npz'} was made under --protocol=paired, not "
       "--protocol=unimodal; re-embed, or pass --protocol=paired"),
      ([f"--embeddings={tmp_path / 'absent.npz'}"],
       f"--embeddings={tmp_path / 'absent.npz'}: no such file"),
      ([f"--variables={vars_}"], "--variables needs --data=FILE.npz (the paired-feature file)"),
      ([f"--variables={vars_}", f"--data={tmp_path}"], f"--data={tmp_path}: a folder, not a file"),
      ([f"--variables={vars_}", f"--data={data}", "--split=validation"],
       f"--split=validation: --data={data} has no such split (no visual_validation, "
       "audio_validation or lab_validation); expected one of its splits: test, train"),
      ([f"--variables={tmp_path / 'bare.npz'}", f"--data={data}"],
       f"--variables={tmp_path / 'bare.npz'}: no stored model arguments; pass the model's "
       "arguments (at least num_classes) with --model_kwargs"),
      ([f"--variables={vars_}", f"--data={data}", "--model_kwargs=[1]"],
       "--model_kwargs=[1]: expected a JSON object of DSF3N fields, got list")):
    assert error(argv) == (2, [f"error: {line}"]), argv
  # The contents of a file: status 1.
  np.savez(tmp_path / "nan.npz", emb_visual=np.full((2, 2), np.nan), emb_audio=np.ones((2, 2)),
           labels=[0, 1], protocol="unimodal")
  status, lines = error([f"--embeddings={tmp_path / 'nan.npz'}", "--queries=0"])
  assert status == 1 and len(lines) == 1 and "emb_visual must be finite floats" in lines[0]


def test_top_k_matches_full_ranking():
  rng = np.random.default_rng(1)
  q = rng.integers(-1, 2, (23, 6)).astype(np.float32)  # many ties
  x = rng.integers(-1, 2, (31, 6)).astype(np.float32)
  x[0] = 0  # zero vector
  dist = np.asarray(metrics.pairwise_distances(q, x))
  order = np.argsort(dist, axis=1, kind="stable")[:, :5]
  for bs in (1, 4, 100):
    d, idx = retrieval.top_k(q, x, k=5, block_size=bs)
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_allclose(d, np.take_along_axis(dist, order, 1), atol=1e-6)
  got = retrieval.retrieve(q, x, np.zeros(23, int), np.arange(31) % 2, k=40)
  assert got.indices.shape == (23, 31)
  np.testing.assert_array_equal(got.relevant, got.labels == 0)


def test_embeddings_file_round_trip_and_errors(tmp_path):
  emb = retrieval.Embeddings(np.ones((3, 2), np.float32), np.zeros((3, 2), np.float32),
                             np.array([0, 1, 0]), np.array([5, 6, 7]))
  retrieval.save_embeddings(tmp_path / "e.npz", emb)
  back = retrieval.load_embeddings(tmp_path / "e.npz")
  for a, b in zip(back, emb, strict=True):
    np.testing.assert_array_equal(a, b)
  # A write that fails part-way leaves the earlier file whole and no temporary file behind.
  class Unsaveable:
    def __array__(self, *args, **kwargs):
      raise RuntimeError("disk full")
  with pytest.raises(RuntimeError, match="disk full"):
    retrieval.save_embeddings(tmp_path / "e.npz", emb._replace(labels=Unsaveable()))
  np.testing.assert_array_equal(retrieval.load_embeddings(tmp_path / "e.npz").labels, emb.labels)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz"]
  retrieval.save_embeddings(tmp_path / "f", emb)  # like np.savez: .npz added
  assert (tmp_path / "f.npz").is_file()
  np.savez(tmp_path / "bad.npz", emb_visual=np.ones((3, 2)))
  with pytest.raises(KeyError, match="emb_audio"):
    retrieval.load_embeddings(tmp_path / "bad.npz")
  with pytest.raises(KeyError, match="visual_val"):
    retrieval.load_split(tmp_path / "bad.npz", "val")
  with pytest.raises(ValueError, match="exactly one of"):
    retrieval.embeddings_from_args(embeddings="a.npz", variables="b.npz")


def test_cli_variables_and_embeddings(tiny, capsys, monkeypatch):
  tmp, _, _, _ = tiny
  out = tmp / "emb.npz"
  assert retrieve.main([f"--variables={tmp / 'vars.npz'}", f"--data={tmp / 'data.npz'}",
                        "--split=test", "--queries=0,5", "--k=3", "--batch_size=16",
                        f"--save_embeddings={out}"]) == 0
  text = capsys.readouterr().out
  assert "query audio row 5" in text and "precision@3" in text and "mAP audio->visual" in text
  emb = retrieval.load_embeddings(out)
  p3 = metrics.precision_at_k(emb.emb_audio, emb.emb_visual, emb.labels, emb.labels, k=3)
  assert f"{p3.mean():.4f}" in text
  assert retrieve.main([f"--embeddings={out}", "--query_modality=visual", "--queries=1",
                        "--k=2"]) == 0
  text = capsys.readouterr().out
  assert "query visual row 1" in text and "-> audio" in text
  with pytest.raises(ValueError, match=r"--queries: rows \[99\] out of range \[0, \d+\)"):
    retrieve.main([f"--embeddings={out}", "--queries=99"])
  # Checked before the split is embedded: the model is never called.
  monkeypatch.setattr(retrieval, "embed_split", lambda *a, **k: pytest.fail("embedded"))
  with pytest.raises(ValueError, match=r"--queries: rows \[999\] out of range"):
    retrieve.main([f"--variables={tmp / 'vars.npz'}", f"--data={tmp / 'data.npz'}",
                   "--split=test", "--queries=999"])
  with pytest.raises(ValueError, match="--queries: expected comma-separated ints"):
    retrieve.main([f"--embeddings={out}", "--queries=a"])


def test_cli_on_real_data(fsdd_path, tmp_path, capsys):
  model = DSF3N(**{**TINY, "num_classes": 10})
  variables = model.init(jax.random.key(1), jnp.zeros((2, 1024)), jnp.zeros((2, 128)))
  retrieval.save_variables(tmp_path / "v.npz", variables, model_kwargs={**TINY,
                                                                       "num_classes": 10})
  assert retrieve.main([f"--variables={tmp_path / 'v.npz'}", f"--data={fsdd_path}",
                        "--queries=0", "--k=5"]) == 0
  out = capsys.readouterr().out
  assert "precision@5 (audio->visual, 300 queries)" in out
  # The file's test split, each modality embedded alone by the saved model (the default
  # protocol): the mAP printed is theirs.
  data = np.load(fsdd_path)
  emb_v = model.apply(variables, data["visual_test"], method="embed_visual")
  emb_a = model.apply(variables, data["audio_test"], method="embed_audio")
  maps = metrics.cross_modal_map(np.asarray(emb_v), np.asarray(emb_a), data["lab_test"])
  assert f"average {maps['average']:.4f}  (unimodal protocol)" in out, (out, maps)


NOT_NPZ = ("pickle", "object_array", "random_bytes", "hdf5", "npy", "zip_of_other_things",
           "empty")


@pytest.mark.parametrize("kind", NOT_NPZ)
def test_files_that_are_not_an_npz_of_arrays_are_refused(bad_npz_files, assert_refused_npz,
                                                         kind):
  from dsf3n_jax.datasets import DataValidationError
  path = bad_npz_files[kind]
  for load in (retrieval.load_embeddings, retrieval.load_variables,
               lambda p: retrieval.load_split(p, "test")):
    with pytest.raises(DataValidationError) as e:
      load(path)
    assert_refused_npz(str(e.value), path)
  if kind == "hdf5":  # a paired-feature file may be HDF5: under its own name
    with pytest.raises(DataValidationError, match=r"HDF5 file.*name it \.h5"):
      retrieval.load_split(path, "test")
  if kind in ("pickle", "object_array"):
    with pytest.raises(DataValidationError, match="never loaded"):
      retrieval.load_embeddings(path)


def test_a_bad_label_names_its_key_and_row(tiny, tmp_path):
  tmp, _, _, data = tiny
  for bad, message in ((-1, r"row 7 has label -1"), (2.5, r"row 7 label 2\.5 is not an integer")):
    labels = data["lab_test"].astype(type(bad)).copy()
    labels[7] = bad
    np.savez(tmp_path / "d.npz", **{**data, "lab_test": labels})
    with pytest.raises(ValueError, match=rf"d\.npz: key 'lab_test' {message}"):
      retrieval.load_split(tmp_path / "d.npz", "test")


def _run_cli(module, *args, cwd):
  import os
  import subprocess
  import sys

  from dsf3n_jax import cli
  env = {k: v for k, v in os.environ.items() if k != cli.VERBOSE_ENV}
  env.update(JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["dsf3n_jax.retrieve", "dsf3n_jax.visualize"])
def test_cli_workdir_without_a_run_is_one_error_line(tmp_path, module):
  (tmp_path / "empty").mkdir()
  extra = ["--out_dir=figs"] if module.endswith("visualize") else []
  for workdir, why in (("absent", "no such directory"), ("empty", "config.json not found")):
    proc = _run_cli(module, f"--workdir={workdir}", *extra, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: --workdir={workdir}: no training run here ({why})"], proc.stderr
  with pytest.raises(Exception, match=r"no training run here \(config.json not found\)"):
    retrieval.embeddings_from_args(workdir=str(tmp_path / "empty"))


def test_cli_refuses_a_pickle_in_one_error_line(bad_npz_files, tmp_path):
  for kind in ("pickle", "object_array"):
    proc = _run_cli("dsf3n_jax.retrieve", f"--embeddings={bad_npz_files[kind]}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad_npz_files[kind]}: "), lines
    assert "allow_pickle" not in proc.stderr


def test_non_finite_weights_or_embeddings_are_refused(tiny, tmp_path):
  _, model, variables, data = tiny
  broken = jax.tree.map(lambda x: x, jax.device_get(dict(variables)))
  broken["params"]["head"] = jax.tree.map(lambda x: np.full_like(x, np.nan),
                                          broken["params"]["head"])
  with pytest.raises(FloatingPointError, match=r"non-finite visual embeddings for 37 of 37 "
                     r"items \(first: row 0\)"):
    retrieval.embed_split(model, broken, data["visual_test"], data["audio_test"])
  emb = np.ones((3, 2), np.float32)
  emb[1, 0] = np.nan
  np.savez(tmp_path / "nan.npz", emb_visual=emb, emb_audio=np.ones((3, 2)), labels=[0, 1, 0])
  with pytest.raises(ValueError, match=r"nan.npz: emb_visual must be finite floats"):
    retrieval.load_embeddings(tmp_path / "nan.npz")


@pytest.mark.parametrize("tool, argv, hint", [
    ("retrieve", ["--wokdir=x", "--k=3"], "--wokdir: did you mean --workdir?"),
    ("search", ["--index=i", "--query_embedings", "q.npy"],
     "--query_embedings: did you mean --query_embeddings"),
    # a required flag mistyped: named as mistyped, not only as missing
    ("visualize", ["--out_dri=o"], "--out_dri: did you mean --out_dir?"),
    ("index", ["--modality=visual", "--chunk_sise=4"], "--chunk_sise: did you mean --chunk_size"),
    ("convert", ["a.pth", "b", "--to_troch"], "--to_troch: did you mean --to_torch"),
    # no abbreviations: --query is not silently --query_embeddings
    ("search", ["--index=i", "--query", "q.npy"], "--query: did you mean --queries?"),
    ("retrieve", ["--zzzz=1"], None)])  # nothing near: argparse's message alone
def test_a_mistyped_flag_gets_the_nearest_flags(tool, argv, hint, capsys):
  main = importlib.import_module(f"dsf3n_jax.{tool}").main
  with pytest.raises(SystemExit) as exit_:
    main(argv)
  assert exit_.value.code == 2
  last = capsys.readouterr().err.rstrip().splitlines()[-1]
  typo = hint.split(":")[0] if hint else "--zzzz"
  assert f"error: unrecognized arguments: {typo}" in last, last
  assert (f"({hint}" in last) if hint else last.endswith("--zzzz=1"), last


def test_help_is_printed_whatever_else_is_given(capsys):
  with pytest.raises(SystemExit) as exit_:
    retrieve.main(["--wokdir=x", "--help"])
  assert exit_.value.code == 0 and "--workdir" in capsys.readouterr().out
