"""TFDS builders: ``vegas``, ``ave``, ``paired_features`` and ``synthetic``.

All four write array_record files (read back with ``tfds.data_source``, no
TensorFlow) with one example per pair: ``visual`` (Dv,) float32, ``audio``
(Da,) float32, ``label`` class id and ``index``, the row in the source file.
The dataset's ``info.metadata`` holds ``num_classes``, ``visual_dim``,
``audio_dim`` and the source file.

Every array is validated (``validation.validate_arrays``) before the first
example is written; TFDS writes into a temporary directory and renames it only
when generation succeeded, so a bad file never leaves a dataset that a later
load would accept.

Build from the command line (TensorFlow-free wrapper of ``tfds build``)::

  python -m dsf3n_jax.datasets.build vegas --manual_dir=/path/to/dir/with/h5

or, where TensorFlow is installed, ``tfds build vegas --imports
dsf3n_jax.datasets.builders --file_format=array_record --manual_dir=...``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from dsf3n_jax.datasets import synthetic as synthetic_lib
from dsf3n_jax.datasets import validation

_AUTHORS_REPO = "https://github.com/zhangjiwei-japan/icaiic-2024-code"
_CITATION = """@inproceedings{zhang2024dsf3n,
  title={Deep Supervised with Fine-grained Feature Fusion Network for Cross-modal Retrieval},
  author={Zhang, Jiwei and Hachiya, Hirotaka},
  booktitle={ICAIIC},
  year={2024}
}"""


def _features(*, visual_dim: int | None, audio_dim: int | None,
              num_classes: int | None) -> tfds.features.FeaturesDict:
  label = (tfds.features.ClassLabel(num_classes=num_classes) if num_classes
           else tfds.features.Scalar(dtype=np.int64))
  return tfds.features.FeaturesDict({
      "visual": tfds.features.Tensor(shape=(visual_dim,), dtype=np.float32),
      "audio": tfds.features.Tensor(shape=(audio_dim,), dtype=np.float32),
      "label": label,
      "index": tfds.features.Scalar(dtype=np.int64),
  })


class _PairedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared logic: validate six arrays, then write train and test splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # Subclasses: known shapes (None: read from the file).
  _NUM_CLASSES: int | None = None
  _VISUAL_DIM: int | None = None
  _AUDIO_DIM: int | None = None

  def __init__(self, *, file_format=None, **kwargs):
    # array_record by default: random access without TensorFlow.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=_features(visual_dim=self._VISUAL_DIM, audio_dim=self._AUDIO_DIM,
                           num_classes=self._NUM_CLASSES),
        supervised_keys=None,
        homepage=_AUTHORS_REPO,
        citation=_CITATION,
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # Keep file order: example i is row i.
    )

  def _load_arrays(self, dl_manager) -> tuple[dict[str, np.ndarray], str]:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    arrays, source = self._load_arrays(dl_manager)
    num_classes = self._NUM_CLASSES or getattr(self.builder_config, "num_classes", None)
    arrays = validation.validate_arrays(
        arrays, source=source, num_classes=num_classes, visual_dim=self._VISUAL_DIM,
        audio_dim=self._AUDIO_DIM)
    num_classes = num_classes or validation.infer_num_classes(arrays)
    self.info.metadata.update(
        num_classes=int(num_classes), visual_dim=int(arrays["visual_train"].shape[1]),
        audio_dim=int(arrays["audio_train"].shape[1]), source=os.path.basename(source))
    return {split: self._generate_examples(arrays, split) for split in validation.SPLITS}

  def _generate_examples(self, arrays, split):
    keys = validation.KEYS[split]
    visual, audio, label = (arrays[keys[f]] for f in ("visual", "audio", "label"))
    for i in range(len(label)):
      yield i, {"visual": visual[i], "audio": audio[i], "label": int(label[i]), "index": i}


def _manual_dir(dl_manager, *, dataset: str, expected: str, instructions: str) -> str:
  """The manual dir (``--manual_dir``; TFDS's default ``<data_dir>/downloads/manual``), or a
  one-line ``DataValidationError`` naming it, that it is missing (or empty) and ``expected``
  there, with the dataset's ``instructions`` as its ``details`` (printed after it)."""
  try:
    return os.fspath(dl_manager.manual_dir)
  except (AssertionError, NotADirectoryError) as e:  # TFDS: missing, empty, or a file
    folder = getattr(dl_manager, "_manual_dir", None)  # the folder TFDS looked in
    if folder is None:
      state = f"manual_dir not set ({str(e).splitlines()[0]})"
    elif epath.Path(folder).is_dir():
      state = f"manual_dir {folder} is empty"
    elif epath.Path(folder).exists():
      state = f"manual_dir {folder} is a file, not a folder"
    else:
      state = f"manual_dir {folder} does not exist"
    raise validation.DataValidationError(
        f"{dataset}: {state}; expected {expected} there", details=instructions) from e


def _manual_file(dl_manager, filenames: tuple[str, ...], *, dataset: str,
                 instructions: str) -> str:
  """The first of ``filenames`` in the manual dir, or a clear error (``_manual_dir``)."""
  expected = " or ".join(filenames)
  manual_dir = _manual_dir(dl_manager, dataset=dataset, expected=expected,
                           instructions=instructions)
  for name in filenames:
    path = os.path.join(manual_dir, name)
    if os.path.exists(path):
      return path
  found = sorted(os.listdir(manual_dir))
  raise validation.DataValidationError(
      f"{dataset}: manual_dir {manual_dir} holds no {expected} (found: "
      f"{', '.join(found[:5])}{', ...' if len(found) > 5 else ''})", details=instructions)


_MANUAL_TEMPLATE = """\
The {Name} features are published by the DSF3N authors: the README of
{repo} links to them (file `{file}`, HDF5 with keys visual_train (N,1024),
audio_train (N,128), lab_train (N,), visual_test, audio_test, lab_test).
Download `{file}` and place it (or an .npz with the same six arrays, named
`{stem}.npz`) in the manual directory, by default
`<data_dir>/downloads/manual/`, or pass `--manual_dir=DIR` to the build command:

  python -m dsf3n_jax.datasets.build {name} --manual_dir=DIR
"""


class Vegas(_PairedBuilder):
  """VEGAS audio-visual features of the DSF3N authors (10 classes)."""

  _NUM_CLASSES = 10
  _VISUAL_DIM = 1024
  _AUDIO_DIM = 128
  _FILES = ("vegas_feature_norm.h5", "vegas_feature_norm.npz")
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_TEMPLATE.format(
      Name="VEGAS", name="vegas", repo=_AUTHORS_REPO, file=_FILES[0],
      stem="vegas_feature_norm")

  def _load_arrays(self, dl_manager):
    path = _manual_file(dl_manager, self._FILES, dataset=self.name,
                        instructions=self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return validation.read_paired_file(path), path


class Ave(Vegas):
  """AVE audio-visual features of the DSF3N authors (their 15-class subset)."""

  _NUM_CLASSES = 15
  _FILES = ("ave_feature_norm.h5", "ave_feature_norm.npz")
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_TEMPLATE.format(
      Name="AVE", name="ave", repo=_AUTHORS_REPO, file=_FILES[0], stem="ave_feature_norm")


@dataclasses.dataclass(eq=False)
class PairedFeaturesConfig(tfds.core.BuilderConfig):
  """Which file to read.

  Attributes:
    path: the ``.h5``/``.npz`` file; empty: the single such file in manual_dir.
    num_classes: class count; None: ``max(label) + 1`` or the one-hot width.
  """

  path: str = ""
  num_classes: int | None = None


def paired_features_config(path: str | os.PathLike, *,
                           num_classes: int | None = None) -> PairedFeaturesConfig:
  """A config for one file, named after it and its size and mtime.

  A changed file gets a new config name, hence a fresh build.

  Args:
    path: the ``.h5``/``.npz`` file.
    num_classes: class count, or None to infer it.

  Returns:
    A ``PairedFeaturesConfig``.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise validation.DataValidationError(f"{path}: file not found (paired_features path)")
  st = os.stat(path)
  digest = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}|{num_classes}".encode())
  stem = re.sub(r"[^a-z0-9_]", "_", os.path.splitext(os.path.basename(path))[0].lower())
  return PairedFeaturesConfig(name=f"{stem}_{digest.hexdigest()[:10]}", path=path,
                              num_classes=num_classes,
                              description=f"Paired features from {path}")


class PairedFeatures(_PairedBuilder):
  """Any ``.h5``/``.npz`` with the six arrays; sizes and classes from the file."""

  BUILDER_CONFIG_CLASS = PairedFeaturesConfig
  BUILDER_CONFIGS = [PairedFeaturesConfig(
      name="manual", description="The single .h5/.npz file in manual_dir.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Either name the file in the config:
  python -m dsf3n_jax.datasets.build paired_features \\
    --config='{"name": "mydata", "path": "/abs/path/features.npz"}'
or put exactly one .h5/.npz file with the six arrays (visual_train, audio_train,
lab_train, visual_test, audio_test, lab_test) into --manual_dir and build the
default `manual` config.
"""

  def _load_arrays(self, dl_manager):
    path = self.builder_config.path
    if not path:
      manual_dir = _manual_dir(dl_manager, dataset="paired_features",
                               expected="one .h5/.npz file",
                               instructions=self.MANUAL_DOWNLOAD_INSTRUCTIONS)
      files = sorted(f for f in os.listdir(manual_dir)
                     if os.path.splitext(f)[1].lower() in validation.SUFFIXES)
      if len(files) != 1:
        raise validation.DataValidationError(
            f"paired_features: manual_dir {manual_dir} must hold exactly one .h5/.npz file; "
            f"found {files}", details=self.MANUAL_DOWNLOAD_INSTRUCTIONS)
      path = os.path.join(manual_dir, files[0])
    return validation.read_paired_file(path), path


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Keyword arguments of ``generate_synthetic`` (see there)."""

  num_train: int = synthetic_lib.NUM_TRAIN
  num_test: int = synthetic_lib.NUM_TEST
  num_classes: int = 10
  visual_dim: int = 1024
  audio_dim: int = 128
  difficulty: float = synthetic_lib.DIFFICULTY
  seed: int = 0

  def generator_kwargs(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(SyntheticConfig)
            if f.name not in {g.name for g in dataclasses.fields(tfds.core.BuilderConfig)}}


class Synthetic(_PairedBuilder):
  """Class-structured synthetic audio-visual pairs (``generate_synthetic``)."""

  BUILDER_CONFIG_CLASS = SyntheticConfig
  BUILDER_CONFIGS = [SyntheticConfig(name="default", description="The demo defaults.")]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
        features=_features(visual_dim=cfg.visual_dim, audio_dim=cfg.audio_dim,
                           num_classes=cfg.num_classes),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # Keep file order: example i is row i.
    )

  def _load_arrays(self, dl_manager):
    del dl_manager
    return (synthetic_lib.generate_synthetic(**self.builder_config.generator_kwargs()),
            f"synthetic({self.builder_config.name})")
