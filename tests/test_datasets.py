"""Tests of the dataset builders, the validation and the synthetic generator."""

import functools
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dsf3n_jax.datasets import (
  DataValidationError,
  generate_synthetic,
  read_paired_file,
  validate_arrays,
)

SMALL = dict(num_train=60, num_test=25, seed=3)


def _write(path, arrays):
  if str(path).endswith(".npz"):
    np.savez(path, **arrays)
  else:
    import h5py
    with h5py.File(path, "w") as f:
      for k, v in arrays.items():
        f.create_dataset(k, data=v)
  return str(path)


def _one_hot(arrays, num_classes=10):
  out = dict(arrays)
  for s in ("train", "test"):
    out[f"lab_{s}"] = np.eye(num_classes, dtype=np.float32)[arrays[f"lab_{s}"]]
  return out


def test_synthetic_deterministic_shapes():
  a, b = generate_synthetic(**SMALL), generate_synthetic(**SMALL)
  assert a["visual_train"].shape == (60, 1024) and a["audio_test"].shape == (25, 128)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  c = generate_synthetic(**{**SMALL, "seed": 4})
  assert not np.allclose(a["visual_train"], c["visual_train"])
  assert set(np.unique(a["lab_train"])) == set(range(10))


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
@pytest.mark.parametrize("one_hot", [False, True])
def test_read_and_validate_roundtrip(tmp_path, suffix, one_hot):
  arrays = generate_synthetic(**SMALL)
  path = _write(tmp_path / f"f{suffix}", _one_hot(arrays) if one_hot else arrays)
  got = validate_arrays(read_paired_file(path), source=path)
  for k in arrays:
    np.testing.assert_array_equal(got[k], arrays[k])
  assert got["lab_train"].dtype == np.int32


def _bad_cases():
  base = generate_synthetic(**SMALL)

  def edit(**kw):
    out = dict(base)
    for k, v in kw.items():
      if v is None:
        del out[k]
      else:
        out[k] = v
    return out

  nan = base["visual_train"].copy()
  nan[7, 3] = np.nan
  nan[9, 0] = np.inf
  onehot = _one_hot(base)
  bad_onehot = onehot["lab_train"].copy()
  bad_onehot[4] = 0.5
  no_class = base["lab_train"].copy()
  no_class[no_class == 9] = 0
  huge = base["audio_test"].copy()
  huge[5, 2] = 3e38  # finite, but it overflows float32 in the first layers
  past_float32 = base["audio_test"].astype(np.float64)
  past_float32[5, 2] = 1e300
  return {
      "missing": (edit(audio_test=None), {}, r"missing key.*audio_test"),
      "rank": (edit(visual_train=base["visual_train"][:, :, None]), {}, r"visual_train.*rank 3"),
      "feature_size": (base, dict(visual_dim=512), r"visual_train.*feature size 1024.*512"),
      "counts": (edit(audio_train=base["audio_train"][:-1]), {}, r"counts differ"),
      "label_range": (base, dict(num_classes=5), r"lab_train.*outside 0\.\.4"),
      "negative": (edit(lab_test=base["lab_test"] - 1), {}, r"lab_test.*outside"),
      "not_one_hot": (edit(lab_train=bad_onehot, lab_test=onehot["lab_test"]), {},
                      r"lab_train.*row 4 is not one-hot"),
      "nan": (edit(visual_train=nan), {}, r"visual_train.*2 non-finite.*first bad row 7"),
      "empty": (edit(visual_test=base["visual_test"][:0], audio_test=base["audio_test"][:0],
                     lab_test=base["lab_test"][:0]), {}, r"'test' is empty"),
      "absent_class": (edit(lab_train=no_class), dict(num_classes=10),
                       r"lab_train.*no example of class.*\[9\]"),
      "overflowing": (edit(audio_test=huge), {},
                      r"key 'audio_test' row 5 has a value of 3e\+38 .*overflow float32"),
      # One stray label far past the classes: one line, not an array of a billion counts.
      "stray_label": (edit(lab_train=np.where(np.arange(len(base["lab_train"])) == 3, 10**9,
                                              base["lab_train"])), {},
                      r"lab_train.*row 3 has label 1000000000, which makes 1000000001 classes"),
      "no_features": (edit(visual_train=base["visual_train"][:, :0],
                           visual_test=base["visual_test"][:, :0]), {},
                      r"visual_train.*shape \(\d+, 0\), no visual features"),
      # Finite in float64, past float32: too large, not "non-finite".
      "past_float32": (edit(audio_test=past_float32), {},
                       r"key 'audio_test' row 5 has a value of 1e\+300 .*rescale"),
      "one_class": (edit(lab_train=np.zeros_like(base["lab_train"]),
                         lab_test=np.zeros_like(base["lab_test"])), {},
                    r"'lab_train' has only class 0 .*expected at least 2 classes"),
  }


BAD = _bad_cases()


@pytest.mark.parametrize("case", sorted(BAD))
def test_validation_errors(case):
  arrays, kwargs, pattern = BAD[case]
  with pytest.raises(DataValidationError, match=pattern) as e:
    validate_arrays(arrays, source="/data/x.h5", **kwargs)
  assert "/data/x.h5" in str(e.value)


def test_unreadable_and_truncated(tmp_path):
  with pytest.raises(DataValidationError, match="not found"):
    read_paired_file(tmp_path / "absent.h5")
  path = _write(tmp_path / "f.h5", generate_synthetic(**SMALL))
  data = open(path, "rb").read()
  for name, content in (("trunc.h5", data[: len(data) // 2]), ("junk.npz", b"not a zip")):
    with open(tmp_path / name, "wb") as f:
      f.write(content)
    with pytest.raises(DataValidationError, match=rf"{name}.*(unreadable|truncated)"):
      arrays = read_paired_file(tmp_path / name)
      validate_arrays(arrays, source=name)  # A truncated h5 may lose keys instead.


@pytest.fixture()
def data_dirs(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  return str(tmp_path / "tfds"), manual


@pytest.mark.parametrize("name,fmt,one_hot,num_classes", [
    ("vegas", ".h5", False, 10), ("ave", ".npz", True, 15)])
def test_vegas_ave_builders(data_dirs, name, fmt, one_hot, num_classes):
  from dsf3n_jax import input_pipeline
  data_dir, manual = data_dirs
  arrays = generate_synthetic(**SMALL, num_classes=num_classes)
  _write(manual / f"{name}_feature_norm{fmt}",
         _one_hot(arrays, num_classes) if one_hot else arrays)
  src = input_pipeline.load_sources(name, data_dir=data_dir, path=str(manual))
  assert (src.num_classes, src.visual_dim, src.audio_dim) == (num_classes, 1024, 128)
  for split, s in (("train", src.train), ("test", src.test)):
    got = input_pipeline.load_split_arrays(s)
    np.testing.assert_array_equal(got["visual"], arrays[f"visual_{split}"])
    np.testing.assert_array_equal(got["audio"], arrays[f"audio_{split}"])
    np.testing.assert_array_equal(got["label"], arrays[f"lab_{split}"])
    np.testing.assert_array_equal(got["index"], np.arange(len(got["label"])))
  # Reading the built dataset again needs no file.
  os.remove(manual / f"{name}_feature_norm{fmt}")
  again = input_pipeline.load_sources(name, data_dir=data_dir)
  assert len(again.test) == 25


def test_bad_file_leaves_no_dataset(data_dirs):
  from dsf3n_jax import input_pipeline
  data_dir, manual = data_dirs
  arrays = generate_synthetic(**SMALL)
  arrays["audio_test"] = arrays["audio_test"].copy()
  arrays["audio_test"][5] = np.nan
  _write(manual / "vegas_feature_norm.npz", arrays)
  for _ in range(2):  # The failed build must not leave anything a second load accepts.
    with pytest.raises(DataValidationError, match="audio_test.*first bad row 5"):
      input_pipeline.load_sources("vegas", data_dir=data_dir, path=str(manual))


def test_missing_manual_file(data_dirs):
  """One line naming the folder, that it is empty (or lacks the file) and what it should
  hold; the instructions apart, as the error's details."""
  from dsf3n_jax import input_pipeline
  data_dir, manual = data_dirs
  with pytest.raises(DataValidationError) as e:
    input_pipeline.load_sources("vegas", data_dir=data_dir, path=str(manual))
  assert str(e.value) == (f"vegas: manual_dir {manual} is empty; expected "
                          "vegas_feature_norm.h5 or vegas_feature_norm.npz there")
  assert "python -m dsf3n_jax.datasets.build vegas --manual_dir=DIR" in e.value.details
  (manual / "notes.txt").write_text("x")
  with pytest.raises(DataValidationError) as e:
    input_pipeline.load_sources("vegas", data_dir=data_dir, path=str(manual))
  assert str(e.value) == (f"vegas: manual_dir {manual} holds no vegas_feature_norm.h5 or "
                          "vegas_feature_norm.npz (found: notes.txt)")


def test_the_build_command_names_a_missing_manual_folder_first(tmp_path):
  """The error line names the folder and that it does not exist (or is a file); the dataset's
  instructions follow as text, not as more errors (nor a traceback, for paired_features)."""
  (tmp_path / "feats.h5").write_bytes(b"")  # the file given where its folder belongs
  for name, folder, state, expected in (
      ("vegas", "absent", "does not exist", "vegas_feature_norm.h5 or vegas_feature_norm.npz"),
      ("paired_features", "absent", "does not exist", "one .h5/.npz file"),
      ("vegas", "feats.h5", "is a file, not a folder",
       "vegas_feature_norm.h5 or vegas_feature_norm.npz")):
    out = subprocess.run(
        [sys.executable, "-m", "dsf3n_jax.datasets.build", name,
         f"--manual_dir={tmp_path / folder}", f"--data_dir={tmp_path / 'tfds'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    errors = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert errors == [f"error: {name}: manual_dir {tmp_path / folder} {state}; "
                      f"expected {expected} there"], out.stderr[-2000:]
    after = out.stderr.split(errors[0], 1)[1]
    assert (f"python -m dsf3n_jax.datasets.build {name}" in after
            and "--manual_dir" in after), out.stderr[-2000:]


def test_paired_features_and_dim_check(data_dirs):
  from dsf3n_jax import input_pipeline
  data_dir, manual = data_dirs
  arrays = generate_synthetic(**SMALL, num_classes=4, visual_dim=20, audio_dim=6)
  path = _write(manual / "small.npz", arrays)
  src = input_pipeline.load_sources("paired_features", data_dir=data_dir, path=path)
  assert (src.num_classes, src.visual_dim, src.audio_dim) == (4, 20, 6)
  got = input_pipeline.load_split_arrays(src.test)
  np.testing.assert_array_equal(got["visual"], arrays["visual_test"])
  with pytest.raises(DataValidationError, match="visual_dim is 20.*expected 1024"):
    input_pipeline.load_sources("paired_features", data_dir=data_dir, path=path,
                                visual_dim=1024)


def test_synthetic_builder_matches_in_memory(tmp_path):
  import tensorflow_datasets as tfds

  from dsf3n_jax import input_pipeline
  from dsf3n_jax.datasets import builders
  config = builders.SyntheticConfig(name="tiny", num_train=40, num_test=12, seed=5)
  builder = tfds.builder("synthetic", config=config, data_dir=str(tmp_path))
  builder.download_and_prepare()
  mem = input_pipeline.load_sources("synthetic", synthetic=config.generator_kwargs())
  ds = input_pipeline.TfdsSource(builder.as_data_source("train"))
  a, b = input_pipeline.load_split_arrays(ds), input_pipeline.load_split_arrays(mem.train)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_fsdd_paired_features(fsdd_path, tmp_path):
  from dsf3n_jax import input_pipeline
  src = input_pipeline.load_sources("paired_features", data_dir=str(tmp_path), path=fsdd_path,
                                    num_classes=10, visual_dim=1024, audio_dim=128,
                                    validation_fraction=0.1)
  assert len(src.test) == 300 and len(src.train) + len(src.validation) == 2700
  raw = np.load(fsdd_path)
  got = input_pipeline.load_split_arrays(src.test)
  np.testing.assert_array_equal(got["audio"], raw["audio_test"])
  val = input_pipeline.load_split_arrays(src.validation)
  np.testing.assert_array_equal(val["visual"], raw["visual_train"][val["index"]])


def test_reading_built_dataset_imports_no_tensorflow(data_dirs):
  data_dir, manual = data_dirs
  _write(manual / "vegas_feature_norm.npz", generate_synthetic(**SMALL))
  code = (
      "import sys\n"
      "from dsf3n_jax import input_pipeline as ip\n"
      f"s = ip.load_sources('vegas', data_dir={data_dir!r}, path={str(manual)!r})\n"
      "assert len(ip.load_split_arrays(s.train)['label']) == 60\n"
      "s = ip.load_sources('vegas', data_dir=" + repr(data_dir) + ")\n"
      "ip.load_split_arrays(s.test)\n"
      "print('TF' if 'tensorflow' in sys.modules else 'NO_TF')\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "NO_TF"


_USER_BUILDERS = """
import numpy as np
import tensorflow_datasets as tfds


class _Pairs(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  BAD = None  # "feature": a NaN in a train row; "label": a test row of a class train lacks

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "visual": tfds.features.Tensor(shape=(8,), dtype=np.float32),
        "audio": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        "label": tfds.features.Scalar(dtype=np.int64)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(24, "train"),
            "test": self._generate_examples(9, "test")}

  def _generate_examples(self, n, split):
    rng = np.random.default_rng(len(split))
    for i in range(n):
      visual = rng.normal(size=8).astype(np.float32)
      if self.BAD == "feature" and split == "train" and i == 3:
        visual[2] = np.nan
      label = 7 if self.BAD == "label" and split == "test" and i == 5 else i % 3
      yield i, {"visual": visual, "audio": rng.normal(size=4).astype(np.float32),
                "label": label}


class NanPairs(_Pairs):
  BAD = "feature"


class StrangerPairs(_Pairs):
  BAD = "label"


class FinePairs(_Pairs):
  pass


class DeclaredPairs(_Pairs):  # a ClassLabel of 5 classes, 3 of them in the data
  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "visual": tfds.features.Tensor(shape=(8,), dtype=np.float32),
        "audio": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        "label": tfds.features.ClassLabel(num_classes=5)}))


class HotPairs(_Pairs):  # one-hot labels: not a class id
  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "visual": tfds.features.Tensor(shape=(8,), dtype=np.float32),
        "audio": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        "label": tfds.features.Tensor(shape=(3,), dtype=np.int64)}))

  def _generate_examples(self, n, split):
    for key, example in super()._generate_examples(n, split):
      yield key, {**example, "label": np.eye(3, dtype=np.int64)[example["label"]]}
"""


def test_a_users_tfds_dataset_is_validated_as_the_projects_files_are(tmp_path, monkeypatch):
  import pathlib

  from dsf3n_jax import input_pipeline
  (tmp_path / "user_pairs.py").write_text(_USER_BUILDERS)
  monkeypatch.syspath_prepend(str(tmp_path))
  data_dir = tmp_path / "tfds"
  with pytest.raises(DataValidationError, match=r"'user_pairs:nan_pairs'.*key 'visual_train' "
                     r"has 1 non-finite.*first bad row \d+"):
    input_pipeline.load_sources("user_pairs:nan_pairs", data_dir=str(data_dir))
  with pytest.raises(DataValidationError, match=r"'user_pairs:stranger_pairs'.*lab_test"):
    input_pipeline.load_sources("user_pairs:stranger_pairs", data_dir=str(data_dir))
  with pytest.raises(DataValidationError, match=r"key 'lab_train' has shape \(24, 3\); expected "
                     r"one class id per example"):
    input_pipeline.load_sources("user_pairs:hot_pairs", data_dir=str(data_dir))
  assert input_pipeline.load_sources("user_pairs:declared_pairs",
                                     data_dir=str(data_dir)).num_classes == 5
  # The integer labels' class count is over both splits; "~" is the home folder.
  monkeypatch.setenv("HOME", str(tmp_path))
  fine = input_pipeline.load_sources("user_pairs:fine_pairs", data_dir="~/tfds")
  assert (fine.num_classes, fine.visual_dim, fine.audio_dim) == (3, 8, 4)
  assert (data_dir / "fine_pairs").is_dir() and not (pathlib.Path.cwd() / "~").exists()


def test_the_build_command_reports_bad_data_in_one_line_and_expands_home(tmp_path):
  arrays = generate_synthetic(**SMALL)
  arrays["audio_test"][7, 1] = np.nan
  _write(tmp_path / "nan.npz", arrays)
  out = subprocess.run(
      [sys.executable, "-m", "dsf3n_jax.datasets.build", "paired_features",
       f'--config={{"name": "x", "path": "{tmp_path / "nan.npz"}"}}', "--data_dir=~/tfds"],
      cwd=tmp_path, capture_output=True, text=True, timeout=120,
      env={**os.environ, "HOME": str(tmp_path / "home"), "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 1, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert re.search(r"^error: .*nan\.npz: key 'audio_test' has 1 non-finite .*first bad row 7",
                   out.stderr, re.M), out.stderr[-2000:]
  assert (tmp_path / "home" / "tfds").is_dir() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("kind", ["pickle", "object_array", "random_bytes", "hdf5", "npy",
                                  "zip_of_other_things", "empty"])
def test_a_feature_file_that_is_not_an_npz_of_arrays_is_refused(bad_npz_files,
                                                                assert_refused_npz, kind):
  path = bad_npz_files[kind]
  with pytest.raises(DataValidationError) as e:
    read_paired_file(path)
  assert_refused_npz(str(e.value), path)
  if kind == "hdf5":
    assert "name it .h5" in str(e.value)


def test_an_npz_named_h5_is_named_a_zip(tmp_path):
  path = _write(tmp_path / "f.npz", generate_synthetic(**SMALL))
  os.rename(path, tmp_path / "f.h5")
  with pytest.raises(DataValidationError, match=r"f\.h5: .*zip archive \(an \.npz\?\)"):
    read_paired_file(tmp_path / "f.h5")


def _lab_test_bad_at_row_7(value, *, one_hot=False):
  arrays = generate_synthetic(**SMALL, num_classes=4, visual_dim=20, audio_dim=6)
  if one_hot:
    arrays = _one_hot(arrays, 4)
    arrays["lab_test"][7] = value
  else:
    arrays["lab_test"] = arrays["lab_test"].astype(np.asarray(value).dtype)
    arrays["lab_test"][7] = value
  return arrays


LAB_TEST_ROW_7 = {  # label value at row 7 of lab_test -> the rest of the message
    "unseen_class": (4, {}, "has label 4, a class with no example in 'lab_train'"),
    "far_class": (99, {}, "has label 99, a class with no example in 'lab_train'"),
    "negative": (-1, {}, "has label -1, outside"),
    "num_classes": (4, dict(num_classes=4), r"has label 4, outside 0\.\.3"),
    "fraction": (2.5, {}, r"label 2\.5 is not an integer class id"),
    "nan": (np.nan, {}, "non-finite .*first bad row 7"),
    "one_hot": ([0, 1, 1, 0], dict(one_hot=True), "is not one-hot"),
    # Past int32: reported as stored, never wrapped into a class (2**32 + 2 would be 2).
    "past_int32": (2**32 + 2, {}, r"has label 4294967298, outside 0\.\.2147483647"),
    "uint64_max": (np.uint64(2**64 - 1), {}, r"has label 18446744073709551615, outside"),
    "huge_float": (1e19, {}, r"has label 1e\+19, outside"),
}


def test_a_column_of_class_ids_is_read_as_class_ids():
  """(N, 1) labels are ids, not one-hot rows of a single class."""
  arrays = generate_synthetic(**SMALL)
  column = {**arrays, "lab_train": arrays["lab_train"][:, None],
            "lab_test": arrays["lab_test"][:, None]}
  got = validate_arrays(column, source="x.npz")
  for key in ("lab_train", "lab_test"):
    np.testing.assert_array_equal(got[key], arrays[key])


@pytest.mark.parametrize("case", sorted(LAB_TEST_ROW_7))
def test_a_bad_test_label_names_lab_test_and_its_row(case):
  value, kwargs, rest = LAB_TEST_ROW_7[case]
  kwargs = dict(kwargs)
  arrays = _lab_test_bad_at_row_7(value, one_hot=kwargs.pop("one_hot", False))
  with pytest.raises(DataValidationError, match=r"^/d/x\.npz: key 'lab_test' .*row 7") as e:
    validate_arrays(arrays, source="/d/x.npz", **kwargs)
  assert re.search(rest, str(e.value)), str(e.value)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("num_classes", [None, 4])
def test_a_bad_test_label_through_load_sources(data_dirs, num_classes):
  # The path training takes: config.data.name=paired_features, config.data.path=FILE.
  from dsf3n_jax import input_pipeline
  data_dir, manual = data_dirs
  path = _write(manual / "feats.npz", _lab_test_bad_at_row_7(4))
  with pytest.raises(DataValidationError) as e:
    input_pipeline.load_sources("paired_features", data_dir=data_dir, path=path,
                                num_classes=num_classes)
  message = str(e.value)
  assert message.startswith(f"{path}: key 'lab_test' row 7 has label 4"), message
  assert "\n" not in message


def test_a_split_smaller_than_its_class_count_is_a_loud_warning():
  from dsf3n_jax.datasets.validation import DegenerateDataWarning
  base = generate_synthetic(**SMALL)
  one = {**base, "visual_test": base["visual_test"][:1], "audio_test": base["audio_test"][:1],
         "lab_test": base["lab_test"][:1]}
  with pytest.warns(DegenerateDataWarning, match=r"/d/x.npz: split 'test' has 1 item\(s\) for "
                    r"10 classes .*mAP 1.0 for any model"):
    validate_arrays(one, source="/d/x.npz", num_classes=10)


_BUILD = """
import sys
from dsf3n_jax import input_pipeline
src = input_pipeline.load_sources("paired_features", data_dir=sys.argv[1], path=sys.argv[2])
print(src.num_classes, len(src.train))
"""


def test_processes_building_one_dataset_wait_for_each_other(data_dirs):
  """Before: the second died with a FileExistsError traceback on TFDS's rename of the first's
  ``incomplete.*`` folder. Now one builds while the other waits, then reads it."""
  data_dir, manual = data_dirs
  path = _write(manual / "shared.npz", generate_synthetic(**SMALL, num_classes=4,
                                                          visual_dim=20, audio_dim=6))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, "-c", _BUILD, str(data_dir), str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for _ in range(3)]
  outs = [p.communicate(timeout=600) for p in procs]
  for proc, (out, err) in zip(procs, outs):
    assert proc.returncode == 0, err[-3000:]
    assert out.splitlines()[-1].split() == ["4", "60"], out


def test_a_builder_made_before_another_process_built_the_dataset_is_made_anew(data_dirs):
  """The race behind a rare failure of the test above: the second process made its builder
  (empty dataset info) before the first finished, then found the dataset prepared."""
  import tensorflow_datasets as tfds

  from dsf3n_jax.datasets import builders, sources
  data_dir, manual = data_dirs
  path = _write(manual / "race.npz", generate_synthetic(**SMALL, num_classes=4, visual_dim=20,
                                                        audio_dim=6))
  make = functools.partial(tfds.builder, "paired_features", data_dir=str(data_dir),
                           config=builders.paired_features_config(str(path)))
  stale = make()  # made before the dataset exists: its info has no splits
  assert not stale.is_prepared() and not stale.info.splits
  sources._prepared(make(), make)  # "the other process" builds it
  got = sources._prepared(stale, make)
  assert got is not stale and got.info.splits["train"].num_examples == 60


def test_an_unknown_dataset_is_named_where_it_was_given(tmp_path):
  from dsf3n_jax.datasets.sources import UnknownDatasetError, load_sources
  with pytest.raises(UnknownDatasetError, match=r"^config\.data\.name='no_such_dataset_x': not "
                     r"'synthetic' and not a TFDS dataset .*\(by the config file, or name it "
                     r"'module:name'\)$"):
    load_sources("no_such_dataset_x", data_dir=str(tmp_path))
  with pytest.raises(UnknownDatasetError, match=r"^--tfds=no_such_module_x:ds: cannot import "
                     r"'no_such_module_x'"):
    load_sources("no_such_module_x:ds", data_dir=str(tmp_path), flag="--tfds")
